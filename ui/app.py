"""Assemble the tabs into one Blocks app; `launch_options` holds what Gradio 6 takes at launch time."""

from __future__ import annotations

from typing import Any

import gradio as gr

from slm.jobs import TrainingManager

from .common import AppSettings
from .generate_tab import build_generate_tab
from .inspect_tab import build_inspect_tab
from .models import ModelPicker, ModelRegistry
from .step_tab import build_step_tab
from .tokens_tab import build_tokens_tab
from .train_tab import build_train_tab
from .watch_tab import build_watch_tab

TITLE = "slm-playground"
CSS = """
.big-text textarea, .big-text .textfield { font-size: 1.3rem !important; line-height: 1.7 !important; }
.prob-legend { display: flex; gap: .6em; align-items: center; flex-wrap: wrap; }
.prob-bar { display: inline-block; width: 12em; height: 1.1em; border: 1px solid #888; border-radius: 3px;
            background: linear-gradient(to right, rgba(239, 68, 60, 0), rgba(239, 68, 60, 1)); }
.prob-note { opacity: .75; }
.app-title h1 { font-size: 1.4rem !important; margin: 0 !important; }
.app-title small { font-size: .95rem; font-weight: 400; opacity: .8; margin-left: .5em; }
#model-description { font-size: .95rem; }
#model-description p { margin: 0 !important; }
#step-layout { --layout-gap: 10px; }
/* Step by step, for a projector: large type, the distribution as HTML bars, everything on one screen */
.step-story .textfield { max-height: 7.2em; overflow-y: auto; }
.step-announce { font-size: 1.35rem; min-height: 1.6em; }
.step-announce p { margin: 0 !important; }
.big-button { font-size: 1.3rem !important; }
.step-buttons button { white-space: nowrap; }
.step-choice label { padding: 1px 6px !important; font-family: ui-monospace, monospace; font-size: 1rem !important; }
.step-choice .wrap { gap: 4px !important; }
.step-controls input[type=number] { width: 4.5em !important; }
.step-help { display: grid; grid-template-columns: 1fr 1fr 1fr 110px; gap: 10px; font-size: .9rem; line-height: 1.3;
             opacity: .85; }
.step-options { font-size: .9rem; }
.dist { font-size: 1.15rem; line-height: 1.2; }
.dist-row { display: grid; grid-template-columns: 1.4em minmax(5em, 8.5em) 1fr 3.6em 1fr 3.6em; gap: .4em;
            align-items: center; padding: 1px 0; }
.dist-head { font-size: .95rem; opacity: .8; }
.dist-span { grid-column: span 2; }
.dist-rank { opacity: .6; text-align: right; }
.dist-token { font-family: ui-monospace, monospace; font-weight: 600; white-space: pre; overflow: hidden;
              text-overflow: ellipsis; }
.dist-bar { position: relative; height: 1.1em; background: rgba(128, 128, 128, .12); border-radius: 3px; }
.dist-bar i { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 3px; }
.dist-bar.model i { background: #3b75af; }
.dist-bar.sampler i { background: #e8892b; }
.dist-p { font-weight: 600; font-variant-numeric: tabular-nums; text-align: right; }
.dist-row.cut .dist-token, .dist-row.cut .dist-p:last-child { opacity: .4; text-decoration: line-through; }
.dist-foot { font-size: .95rem; opacity: .8; margin-top: .2em; }
.dist-help { font-size: .9rem; }
"""


def launch_options() -> dict[str, Any]:
    """Theme and CSS (Gradio 6 takes them in `launch`): large text, for projectors."""
    return {"theme": gr.themes.Default(text_size=gr.themes.sizes.text_lg), "css": CSS}


def build_app(settings: AppSettings, manager: TrainingManager | None = None) -> gr.Blocks:
    """The playground. `manager` is the server's one TrainingManager (made here when not given)."""
    registry = ModelRegistry(settings)
    # uploads wait in Gradio's temporary cache: files older than an hour are removed, checked every hour
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        note = " · <b>public demo</b>: no training, uploads or Hub downloads" if settings.demo else ""
        picker = ModelPicker(registry, heading=(
            f"# {TITLE} <small>a Gemma 3-style small language model, built from scratch: generate, look inside, "
            f"train{note}</small>"
        ))
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                build_generate_tab(picker)
            with gr.Tab("Tokens", id="tokens") as tokens_tab:
                build_tokens_tab(picker, tokens_tab)
            with gr.Tab("Step by step", id="step") as step_tab:
                build_step_tab(picker, step_tab)
            with gr.Tab("Inspect", id="inspect"):
                build_inspect_tab(picker)
            with gr.Tab("Watch it learn", id="watch"):
                build_watch_tab(settings)
            with gr.Tab("Train", id="train") as train_tab:
                build_train_tab(picker, settings, manager, train_tab)
        picker.wire()

        def start_session():
            """A new visitor gets the configured model, else the best checkpoint of the latest real run."""
            entries = registry.entries()
            key = registry.default_key(entries)
            return key, gr.Dropdown(choices=[(e.label, e.key) for e in entries], value=key), registry.describe(key)

        demo.load(start_session, None, [picker.state, picker.dropdown, picker.description], api_visibility="private")
    return demo
