"""Step-by-step tab, for lectures: one token per click, with the distribution it is drawn from.

Laid out for a projector (1280x720): the text and the buttons on the left, the distribution (drawn
by the browser as HTML bars, so it stays sharp and large) and the sampling controls on the right,
all on one screen. Every draw is announced with its probability and rank, and the text can be
coloured by the probability each token had when it was chosen.
"""

from __future__ import annotations

import html

import gradio as gr
import torch

from slm import Tokenizer
from slm.inspection import SamplingView, TokenChoice, next_token_logits, sampling_view, token_choice
from slm.plots import describe_settings, percent
from slm.sampling import NAN_TOKEN, make_generator
from slm.sampling import sample as draw_token

from .common import gpu, integer, prompt_ids, user_errors
from .generate_tab import DEFAULT_PROMPT, read_settings
from .models import ModelPicker

CANDIDATES = 8  # as many as fit beside the controls on a 1280x720 projector
SAMPLED, CHOSEN = "sampled", "chosen by you"

# (label, explanation shown beside the control, short note shown when the presenter hides explanations)
CONTROLS_HELP = (  # beside each control, in the same columns; the presenter can hide them
    '<div class="step-help">'
    "<span><b>Temperature</b> divides the logits: below 1 sharper, above 1 flatter, 0 = the top token</span>"
    "<span><b>Top-k</b> keeps the k likeliest tokens (0 = all)</span>"
    "<span><b>Top-p</b> keeps the likeliest tokens until they add up to p (1 = all)</span>"
    "<span><b>Seed</b>: same seed, same draw (-1 = new)</span></div>"
)
CHART_HELP = (
    "<b>entropy</b>: the uncertainty, in nats (e<sup>entropy</sup> equally likely tokens would be as uncertain) · "
    "<b>␣</b> a space, <b>↵</b> a new line · struck out: filtered away by top-k / top-p"
)


def show_token(token: str) -> str:
    """A token for the screen: spaces, new lines and tabs made visible, HTML escaped."""
    return html.escape(token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥"))


def distribution_html(view: SamplingView, explain: bool = True) -> str:
    """The candidates as rows of HTML bars: the model's probability beside the sampler's, on one scale."""
    top = max([c.probability for c in view.candidates] + [c.sampling_probability for c in view.candidates] + [1e-9])
    rows = []
    for rank, c in enumerate(view.candidates, start=1):
        cut = " cut" if c.sampling_probability == 0 else ""
        rows.append(
            f'<div class="dist-row{cut}"><span class="dist-rank">{rank}</span>'
            f'<span class="dist-token">{show_token(c.text)}</span>'
            f'<span class="dist-bar model"><i style="width:{100 * c.probability / top:.1f}%"></i></span>'
            f'<span class="dist-p">{percent(c.probability)}</span>'
            f'<span class="dist-bar sampler"><i style="width:{100 * c.sampling_probability / top:.1f}%"></i></span>'
            f'<span class="dist-p">{percent(c.sampling_probability)}</span></div>'
        )
    settings = html.escape(describe_settings(view.temperature, view.top_k, view.top_p))
    head = (
        '<div class="dist-row dist-head"><span></span><span>next token</span>'
        f'<span class="dist-span">model · entropy {view.entropy:.2f}</span>'
        f'<span class="dist-span" title="{settings}">sampler · entropy {view.sampling_entropy:.2f} · '
        f"{view.tokens_kept:,} left</span></div>"
    )
    foot = f'<div class="dist-foot">{CHART_HELP}</div>' if explain else ""
    return f'<div class="dist">{head}{"".join(rows)}{foot}</div>'


def announce(verb: str, token: str, choice: TokenChoice) -> str:
    """'Drew ␣girl: 20.1%, rank 2' (with the model's own probability when the settings changed it)."""
    text = f"{verb} **{show_token(token)}**: {percent(choice.sampling_probability)}, rank {choice.rank}"
    if abs(choice.sampling_probability - choice.probability) > 5e-4:
        text += f" (the model alone: {percent(choice.probability)})"
    return text


def new_story(tokenizer: Tokenizer, prompt: str, max_tokens: int) -> dict:
    ids = prompt_ids(tokenizer, prompt, max_tokens)
    if not ids:
        gr.Warning("The prompt is empty: starting from the end-of-text token.")
        ids = [tokenizer.eot_id]
    return {"prompt": prompt, "ids": ids, "kinds": [None] * len(ids), "probs": [None] * len(ids), "last": ""}


def build_step_tab(picker: ModelPicker, tab: gr.Tab) -> None:
    registry = picker.registry
    with gr.Row(equal_height=False, elem_id="step-layout"):
        with gr.Column(scale=5, min_width=420):
            with gr.Row(equal_height=True, elem_classes=["step-buttons"]):
                prompt_box = gr.Textbox(DEFAULT_PROMPT, label="Prompt", container=False, placeholder="Prompt",
                                        scale=4, elem_id="step-prompt", elem_classes=["big-text"])
                start = gr.Button("Start over", scale=1, min_width=100, elem_id="step-start")
            story = gr.HighlightedText(
                label="Text so far", color_map={SAMPLED: "#f4a259", CHOSEN: "#5cb85c"}, show_legend=False,
                show_inline_category=False, combine_adjacent=False, elem_id="step-story",
                elem_classes=["big-text", "step-story"],
            )
            info = gr.Markdown(elem_id="step-info", elem_classes=["step-announce"])
            with gr.Row(equal_height=True, elem_classes=["step-buttons"]):
                sample = gr.Button("Sample next token", variant="primary", scale=3, elem_id="step-sample",
                                   elem_classes=["big-button"])
                pick = gr.Button("Use this token", scale=2, min_width=100, elem_id="step-pick")
                undo = gr.Button("Undo", scale=1, min_width=70, elem_id="step-undo")
            choice_radio = gr.Radio(label="…or choose the next token yourself, then press Use this token",
                                    elem_id="step-choice", elem_classes=["step-choice"])
            with gr.Row(equal_height=True, elem_classes=["step-options"]):
                colour_box = gr.Checkbox(True, label="Colour by probability", container=False,
                                         elem_id="step-colour")
                explain_box = gr.Checkbox(True, label="Explanations", container=False, elem_id="step-explain")
        with gr.Column(scale=6, min_width=480):
            chart = gr.HTML(elem_id="step-chart")
            with gr.Row(equal_height=True, elem_classes=["step-controls"]):
                temperature_slider = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature",
                                               buttons=[], elem_id="step-temperature")
                top_k_slider = gr.Slider(0, 200, value=0, step=1, label="Top-k", buttons=[],
                                         elem_id="step-top-k")
                top_p_slider = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p", buttons=[],
                                         elem_id="step-top-p")
                seed_box = gr.Number(value=0, precision=0, label="Seed", scale=0, min_width=100, elem_id="step-seed")
            controls_help = gr.HTML(CONTROLS_HELP, elem_id="step-help")
    state = gr.State(None)

    def segments(story_state: dict, colour: bool, tokenizer: Tokenizer) -> list[tuple[str, float | str | None]]:
        strings = tokenizer.token_strings(story_state["ids"])
        if colour:
            return list(zip(strings, story_state["probs"], strict=True))
        return list(zip(strings, story_state["kinds"], strict=True))

    def view(story_state: dict, temperature, top_k, top_p, model_key, colour=True, explain=True):
        """Everything the tab shows for the current text and settings."""
        lm = registry.get(model_key)
        model, tokenizer = lm.model, lm.tokenizer
        settings = read_settings(1, temperature, top_k, top_p, None, tokenizer.vocab_size)
        logits = next_token_logits(model, story_state["ids"])
        params = settings.params
        step_view = sampling_view(logits, tokenizer, params.temperature, params.top_k, params.top_p, CANDIDATES)
        choices = [(f"{rank} {show_token(c.text)}", str(c.token_id))
                   for rank, c in enumerate(step_view.candidates, start=1)]
        generated = sum(k is not None for k in story_state["kinds"])
        counts = f"{generated} token{'' if generated == 1 else 's'} added"
        text = f"{story_state['last']} · {counts}" if story_state.get("last") else counts
        return (story_state, segments(story_state, colour is not False, tokenizer),
                distribution_html(step_view, explain is not False), gr.Radio(choices=choices, value=None), text)

    def tokenizer_of(model_key):
        return registry.get(model_key).tokenizer

    def fresh(prompt: str, model_key: str | None) -> dict:
        """A new story from the prompt, trimmed (with a notice) to the model's context."""
        lm = registry.get(model_key)
        return new_story(lm.tokenizer, prompt, lm.model.config.context_length)

    def append(story_state: dict, logits: torch.Tensor, token: int, kind: str, settings, tokenizer: Tokenizer) -> dict:
        params = settings.params
        choice = token_choice(logits, token, params.temperature, params.top_k, params.top_p)
        token_text = tokenizer.token_strings([token])[0]
        last = announce("Drew" if kind == SAMPLED else "You chose", token_text, choice)
        return {**story_state, "ids": [*story_state["ids"], token], "kinds": [*story_state["kinds"], kind],
                "probs": [*story_state["probs"], choice.sampling_probability], "last": last}

    @gpu
    @user_errors
    def restart(prompt, temperature, top_k, top_p, model_key, colour=True, explain=True):
        return view(fresh(prompt, model_key), temperature, top_k, top_p, model_key, colour, explain)

    @gpu
    @user_errors
    def refresh(prompt, temperature, top_k, top_p, story_state, model_key, colour=True, explain=True):
        story_state = story_state or fresh(prompt, model_key)
        return view(story_state, temperature, top_k, top_p, model_key, colour, explain)

    @gpu
    @user_errors
    def sample_one(prompt, temperature, top_k, top_p, seed, story_state, model_key, colour=True, explain=True):
        lm = registry.get(model_key)
        model, tokenizer = lm.model, lm.tokenizer
        story_state = story_state or fresh(prompt, model_key)
        settings = read_settings(1, temperature, top_k, top_p, seed, tokenizer.vocab_size)
        seed = settings.params.seed  # reproducible: the same seed and text give the same draw
        generator = None if seed is None else make_generator(seed * 1_000_003 + len(story_state["ids"]), model.device)
        logits = next_token_logits(model, story_state["ids"])
        token = int(draw_token(logits[None], settings.params, generator)[0])
        if token == NAN_TOKEN:
            raise gr.Error("The model's output is NaN: its weights are probably broken.")
        story_state = append(story_state, logits, token, SAMPLED, settings, tokenizer)
        return view(story_state, temperature, top_k, top_p, model_key, colour, explain)

    @gpu
    @user_errors
    def pick_one(prompt, temperature, top_k, top_p, chosen, story_state, model_key, colour=True, explain=True):
        if chosen is None or chosen == "":
            raise gr.Error("Choose one of the candidate tokens first.")
        tokenizer = tokenizer_of(model_key)
        token = integer(chosen, "token id", 0, tokenizer.vocab_size - 1)
        story_state = story_state or fresh(prompt, model_key)
        settings = read_settings(1, temperature, top_k, top_p, None, tokenizer.vocab_size)
        logits = next_token_logits(registry.get(model_key).model, story_state["ids"])
        story_state = append(story_state, logits, token, CHOSEN, settings, tokenizer)
        return view(story_state, temperature, top_k, top_p, model_key, colour, explain)

    @gpu
    @user_errors
    def undo_one(prompt, temperature, top_k, top_p, story_state, model_key, colour=True, explain=True):
        tokenizer = tokenizer_of(model_key)
        story_state = story_state or fresh(prompt, model_key)
        if story_state["kinds"] and story_state["kinds"][-1] is not None:
            removed = tokenizer.token_strings(story_state["ids"][-1:])[0]
            story_state = {**story_state, "ids": story_state["ids"][:-1], "kinds": story_state["kinds"][:-1],
                           "probs": story_state["probs"][:-1], "last": f"Took back **{show_token(removed)}**"}
        return view(story_state, temperature, top_k, top_p, model_key, colour, explain)

    settings_inputs = [temperature_slider, top_k_slider, top_p_slider]
    display = [picker.state, colour_box, explain_box]
    outputs = [state, story, chart, choice_radio, info]
    start.click(restart, [prompt_box, *settings_inputs, *display], outputs, api_name="step_start")
    prompt_box.submit(restart, [prompt_box, *settings_inputs, *display], outputs, api_visibility="private")
    sample.click(sample_one, [prompt_box, *settings_inputs, seed_box, state, *display], outputs,
                 api_name="step_sample")
    pick.click(pick_one, [prompt_box, *settings_inputs, choice_radio, state, *display], outputs,
               api_name="step_pick")
    undo.click(undo_one, [prompt_box, *settings_inputs, state, *display], outputs, api_name="step_undo")
    refresh_inputs = [prompt_box, *settings_inputs, state, *display]
    # opening the tab shows the distribution straight away (and keeps a story already begun)
    tab.select(refresh, refresh_inputs, outputs, api_visibility="private")
    # .change fires on every way of setting a control: dragging, typing plus Enter, the arrow keys
    for control in [*settings_inputs, colour_box, explain_box]:
        control.change(refresh, refresh_inputs, outputs, api_visibility="private", trigger_mode="always_last",
                       show_progress="hidden")
    explain_box.change(lambda on: gr.HTML(visible=on), explain_box, controls_help, api_visibility="private",
                       queue=False)
