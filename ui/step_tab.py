"""Step-by-step tab, for lectures: one token per click, with the distribution it is drawn from.

The bar chart shows the model's next-token distribution beside the one the sampler draws from
after temperature, top-k and top-p. The presenter samples, or picks any candidate instead.
"""

from __future__ import annotations

import gradio as gr

from slm import Tokenizer
from slm.inspection import next_token_logits, sampling_view
from slm.plots import percent, sampling_bars, visible
from slm.sampling import NAN_TOKEN, make_generator
from slm.sampling import sample as draw_token

from .common import gpu, integer, user_errors
from .generate_tab import DEFAULT_PROMPT, read_settings
from .models import ModelPicker

CANDIDATES = 10
SAMPLED, CHOSEN = "sampled", "chosen by you"


def new_story(tokenizer: Tokenizer, prompt: str) -> dict:
    ids = tokenizer.encode(prompt or "")
    if not ids:
        gr.Warning("The prompt is empty: starting from the end-of-text token.")
        ids = [tokenizer.eot_id]
    return {"prompt": prompt, "ids": ids, "kinds": [None] * len(ids)}


def build_step_tab(picker: ModelPicker, tokenizer: Tokenizer, tab: gr.Tab) -> None:
    registry = picker.registry
    gr.Markdown(
        "Build a text one token at a time. Left: the model's probabilities for the next token. Right: what the "
        "sampler draws from after temperature, top-k and top-p. **Sample** draws from the right-hand side; "
        "or choose a candidate and press **Use this token**."
    )
    with gr.Row():
        prompt_box = gr.Textbox(DEFAULT_PROMPT, label="Prompt", scale=4, elem_id="step-prompt")
        start = gr.Button("Start over", scale=1)
    with gr.Row():
        temperature_slider = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature", info="0 = greedy")
        top_k_slider = gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 = off")
        top_p_slider = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p", info="1 = off")
        seed_box = gr.Number(value=0, precision=0, label="Seed", info="-1 = a different draw every time")
    story = gr.HighlightedText(
        label="Text so far", color_map={SAMPLED: "#f4a259", CHOSEN: "#5cb85c"}, show_legend=True,
        show_inline_category=False, combine_adjacent=False, elem_id="step-story", elem_classes=["big-text"],
    )
    with gr.Row():
        sample = gr.Button("Sample next token", variant="primary", elem_id="step-sample")
        choice_radio = gr.Radio(label="…or choose the next token (model → sampler probability)", scale=3,
                                elem_id="step-choice")
        pick = gr.Button("Use this token", elem_id="step-pick")
        undo = gr.Button("Undo")
    info = gr.Markdown(elem_id="step-info")
    chart = gr.Plot(label="Next-token distribution", show_label=False, elem_id="step-chart")
    state = gr.State(None)

    def view(story_state: dict, temperature, top_k, top_p, model_key):
        """Everything the tab shows for the current text and settings."""
        model = registry.get(model_key)
        settings = read_settings(1, temperature, top_k, top_p, None, tokenizer.vocab_size)
        logits = next_token_logits(model, story_state["ids"])
        params = settings.params
        step_view = sampling_view(logits, tokenizer, params.temperature, params.top_k, params.top_p, CANDIDATES)
        strings = tokenizer.token_strings(story_state["ids"])
        segments = [(s, k) for s, k in zip(strings, story_state["kinds"], strict=True)]
        choices = [
            (f"{visible(c.text)}   {percent(c.probability)} → {percent(c.sampling_probability)}", str(c.token_id))
            for c in step_view.candidates
        ]
        generated = sum(k is not None for k in story_state["kinds"])
        text = (f"{generated} token{'' if generated == 1 else 's'} added · "
                f"{step_view.tokens_kept:,} tokens could be drawn next")
        return story_state, segments, sampling_bars(step_view), gr.Radio(choices=choices, value=None), text

    def append(story_state: dict, token_id: int, kind: str) -> dict:
        return {**story_state, "ids": [*story_state["ids"], token_id], "kinds": [*story_state["kinds"], kind]}

    @gpu
    @user_errors
    def restart(prompt, temperature, top_k, top_p, model_key):
        return view(new_story(tokenizer, prompt), temperature, top_k, top_p, model_key)

    @gpu
    @user_errors
    def refresh(prompt, temperature, top_k, top_p, story_state, model_key):
        return view(story_state or new_story(tokenizer, prompt), temperature, top_k, top_p, model_key)

    @gpu
    @user_errors
    def sample_one(prompt, temperature, top_k, top_p, seed, story_state, model_key):
        story_state = story_state or new_story(tokenizer, prompt)
        settings = read_settings(1, temperature, top_k, top_p, seed, tokenizer.vocab_size)
        model = registry.get(model_key)
        seed = settings.params.seed  # reproducible: the same seed and text give the same draw
        generator = None if seed is None else make_generator(seed * 1_000_003 + len(story_state["ids"]), model.device)
        logits = next_token_logits(model, story_state["ids"])[None]
        token = int(draw_token(logits, settings.params, generator)[0])
        if token == NAN_TOKEN:
            raise gr.Error("The model's output is NaN: its weights are probably broken.")
        return view(append(story_state, token, SAMPLED), temperature, top_k, top_p, model_key)

    @gpu
    @user_errors
    def pick_one(prompt, temperature, top_k, top_p, chosen, story_state, model_key):
        if chosen is None or chosen == "":
            raise gr.Error("Choose one of the candidate tokens first.")
        token = integer(chosen, "token id", 0, tokenizer.vocab_size - 1)
        story_state = story_state or new_story(tokenizer, prompt)
        return view(append(story_state, token, CHOSEN), temperature, top_k, top_p, model_key)

    @gpu
    @user_errors
    def undo_one(prompt, temperature, top_k, top_p, story_state, model_key):
        story_state = story_state or new_story(tokenizer, prompt)
        if story_state["kinds"] and story_state["kinds"][-1] is not None:
            story_state = {**story_state, "ids": story_state["ids"][:-1], "kinds": story_state["kinds"][:-1]}
        return view(story_state, temperature, top_k, top_p, model_key)

    settings_inputs = [temperature_slider, top_k_slider, top_p_slider]
    outputs = [state, story, chart, choice_radio, info]
    start.click(restart, [prompt_box, *settings_inputs, picker.state], outputs, api_name="step_start")
    prompt_box.submit(restart, [prompt_box, *settings_inputs, picker.state], outputs, api_visibility="private")
    sample.click(sample_one, [prompt_box, *settings_inputs, seed_box, state, picker.state], outputs,
                 api_name="step_sample")
    pick.click(pick_one, [prompt_box, *settings_inputs, choice_radio, state, picker.state], outputs,
               api_name="step_pick")
    undo.click(undo_one, [prompt_box, *settings_inputs, state, picker.state], outputs, api_name="step_undo")
    # opening the tab shows the distribution straight away (and keeps a story already begun)
    tab.select(refresh, [prompt_box, *settings_inputs, state, picker.state], outputs, api_visibility="private")
    for slider in settings_inputs:
        slider.release(refresh, [prompt_box, *settings_inputs, state, picker.state], outputs,
                       api_visibility="private")
