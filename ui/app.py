"""Assemble the tabs into one Blocks app; `launch_options` holds what Gradio 6 takes at launch time."""

from __future__ import annotations

from typing import Any

import gradio as gr

from slm.jobs import TrainingManager

from .common import AppSettings
from .generate_tab import build_generate_tab
from .inspect_tab import build_inspect_tab
from .models import ModelPicker, ModelRegistry, usable_key
from .step_tab import build_step_tab
from .train_tab import build_train_tab
from .watch_tab import build_watch_tab

TITLE = "slm-playground"
CSS = """
.big-text textarea, .big-text .textfield { font-size: 1.3rem !important; line-height: 1.7 !important; }
.prob-legend { display: flex; gap: .6em; align-items: center; flex-wrap: wrap; }
.prob-bar { display: inline-block; width: 12em; height: 1.1em; border: 1px solid #888; border-radius: 3px;
            background: linear-gradient(to right, rgba(239, 68, 60, 0), rgba(239, 68, 60, 1)); }
.prob-note { opacity: .75; }
"""


def launch_options() -> dict[str, Any]:
    """Theme and CSS (Gradio 6 takes them in `launch`): large text, for projectors."""
    return {"theme": gr.themes.Default(text_size=gr.themes.sizes.text_lg), "css": CSS}


def build_app(settings: AppSettings, manager: TrainingManager | None = None) -> gr.Blocks:
    """The playground. `manager` is the server's one TrainingManager (made here when not given)."""
    registry = ModelRegistry(settings)
    # uploads wait in Gradio's temporary cache: files older than an hour are removed, checked every hour
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            f"# {TITLE}\nA Gemma 3-style small language model, built from scratch: generate, look inside, train."
        )
        picker = ModelPicker(registry)
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                build_generate_tab(picker)
            with gr.Tab("Step by step", id="step") as step_tab:
                build_step_tab(picker, step_tab)
            with gr.Tab("Inspect", id="inspect"):
                build_inspect_tab(picker)
            with gr.Tab("Watch it learn", id="watch"):
                build_watch_tab(settings)
            with gr.Tab("Train", id="train"):
                build_train_tab(picker, settings, manager)
        picker.wire()

        def start_session():
            entries = registry.entries()
            key = usable_key(entries)
            return key, gr.Dropdown(choices=[(e.label, e.key) for e in entries], value=key), registry.describe(key)

        demo.load(start_session, None, [picker.state, picker.dropdown, picker.description], api_visibility="private")
    return demo
