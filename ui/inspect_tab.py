"""Inspect tab: tokens coloured by probability, next-token candidates, attention maps, logit lens.

One forward pass per "Inspect"; the result stays in this session's state, so choosing a position,
a layer or a head only redraws (the logit lens reruns the final norm and head, nothing more).
"""

from __future__ import annotations

import gradio as gr

from slm.inspection import Inspection, depth_label, inspect_text, logit_lens
from slm.plots import attention_grid, attention_heatmap, logit_lens_figure, next_token_bars, percent

from .common import gpu, integer, user_errors
from .models import ModelPicker

INSPECT_MAX_TOKENS = 256  # an attention map with more tokens than this cannot be read anyway
DEFAULT_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big red ball under a tree. Lily ran to the ball and picked it up. "
    "She was very happy and played with the ball all day."
)
LEGEND = (
    '<div class="prob-legend"><span>probability the model gave each token:</span> <span>0%</span>'
    '<span class="prob-bar"></span><span>100%</span>'
    '<span class="prob-note">(the first token has no colour: nothing comes before it)</span></div>'
)


def details(inspection: Inspection, key: str) -> dict:
    """The numbers behind the view, as the `inspect` API returns them."""
    last = inspection.next_tokens[-1]
    return {
        "model": key,
        "tokens": inspection.tokens,
        "token_ids": inspection.token_ids,
        "probabilities": inspection.token_probabilities,
        "entropy": [v.entropy for v in inspection.next_tokens],
        "dropped_tokens": inspection.dropped_tokens,
        "next_token": {
            "position": last.position,
            "entropy": last.entropy,
            "candidates": [
                {"token": c.text, "token_id": c.token_id, "probability": c.probability} for c in last.candidates
            ],
        },
    }


def build_inspect_tab(picker: ModelPicker) -> None:
    registry = picker.registry
    with gr.Row():
        text_box = gr.Textbox(DEFAULT_TEXT, lines=3, label="Text", scale=5, elem_id="inspect-text")
        with gr.Column(scale=1, min_width=200):
            top_k_slider = gr.Slider(3, 20, value=10, step=1, label="Candidates shown")
            run = gr.Button("Inspect", variant="primary", elem_id="inspect-button")
    notice = gr.Markdown()
    tokens = gr.HighlightedText(
        label="Tokens (click one to choose its position)", show_legend=False, show_inline_category=False,
        combine_adjacent=False, elem_id="inspect-tokens", elem_classes=["big-text"],
    )
    gr.HTML(LEGEND)
    # the bounds are fixed (the API checks a position against the text itself); the UI narrows them per text
    position_slider = gr.Slider(0, INSPECT_MAX_TOKENS - 1, value=0, step=1, elem_id="inspect-position",
                                label="Position: what does the model expect after this token?")
    position_info = gr.Markdown()
    with gr.Row():
        candidates_plot = gr.Plot(label="Next-token candidates", show_label=False, elem_id="inspect-candidates")
        lens_plot = gr.Plot(label="Logit lens", show_label=False, elem_id="inspect-lens")
    with gr.Row():
        layer_box = gr.Dropdown(label="Layer", choices=[], allow_custom_value=True, elem_id="inspect-layer")
        head_box = gr.Dropdown(label="Head", choices=[], allow_custom_value=True, elem_id="inspect-head")
    with gr.Row():
        heatmap = gr.Plot(label="Attention of one head", show_label=False, elem_id="inspect-heatmap")
        grid = gr.Plot(label="All heads of the layer", show_label=False, elem_id="inspect-grid")
    with gr.Accordion("Raw numbers (what the `inspect` API returns)", open=False):
        raw = gr.JSON(label="inspection")
    state = gr.State(None, time_to_live=3600)

    @gpu
    @user_errors
    def run_inspect(text, top_k, model_key):
        if not (text or "").strip():
            raise gr.Error("Enter some text to inspect.")
        lm = registry.get(model_key)
        k = integer(top_k, "candidates shown", 1, 100)
        limit = min(INSPECT_MAX_TOKENS, lm.model.config.context_length)
        inspection = inspect_text(lm.model, lm.tokenizer, text, top_k=k, max_tokens=limit)
        if inspection.dropped_tokens:
            gr.Warning(f"The text is longer than {limit} tokens: its first {inspection.dropped_tokens} were dropped.")
        key = model_key or registry.default_key()
        highlighted = list(zip(inspection.tokens, inspection.token_probabilities, strict=True))
        return {"key": key, "inspection": inspection}, highlighted, details(inspection, key)

    def setup_views(session):
        inspection: Inspection = session["inspection"]
        n = len(inspection)
        note = f"{n} tokens"
        if inspection.dropped_tokens:
            note += f" (the first {inspection.dropped_tokens} tokens of the text were dropped to fit)"
        layers = [(depth_label(i + 1, inspection.layer_types), i) for i in range(len(inspection.layer_types))]
        heads = [(f"head {h}", h) for h in range(inspection.attentions[0].shape[0])]
        return (
            note,
            gr.Slider(minimum=0, maximum=max(n - 1, 1), value=n - 1, step=1),
            gr.Dropdown(choices=layers, value=0),
            gr.Dropdown(choices=heads, value=0),
        )

    @gpu
    @user_errors
    def show_position(position, session):
        if session is None:
            raise gr.Error("Press Inspect first.")
        inspection: Inspection = session["inspection"]
        p = integer(position, "position", 0, len(inspection) - 1)
        view = inspection.next_tokens[p]
        lm = registry.get(session["key"])
        rows = logit_lens(lm.model, lm.tokenizer, inspection, p)
        shown = inspection.tokens[p]
        info = (
            f"After **{shown!r}** (position {p}): entropy {view.entropy:.2f} nats, as uncertain as "
            f"{view.effective_choices:.1f} equally likely tokens."
        )
        if p + 1 < len(inspection):
            info += f" The text continues with {inspection.tokens[p + 1]!r}: "
            info += f"probability {percent(inspection.token_probabilities[p + 1])}."
        return next_token_bars(view, shown), logit_lens_figure(rows, p, shown), info

    @user_errors
    def show_attention(layer, head, session):
        if session is None:
            raise gr.Error("Press Inspect first.")
        inspection: Inspection = session["inspection"]
        layer_index = integer(layer if layer is not None else 0, "layer", 0, len(inspection.attentions) - 1)
        maps = inspection.attentions[layer_index]
        h = integer(head if head is not None else 0, "head", 0, maps.shape[0] - 1)
        label = depth_label(layer_index + 1, inspection.layer_types)
        window = inspection.window_of(layer_index)
        return (
            attention_heatmap(maps[h], inspection.tokens, label, h, window),
            attention_grid(maps, inspection.tokens, label, window),
        )

    def choose_token(event: gr.SelectData):
        return event.index if isinstance(event.index, int) else event.index[0]

    inspect_inputs = [text_box, top_k_slider, picker.state]
    inspect_outputs = [state, tokens, raw]
    position_outputs = [candidates_plot, lens_plot, position_info]
    event = run.click(run_inspect, inspect_inputs, inspect_outputs, api_name="inspect")
    submitted = text_box.submit(run_inspect, inspect_inputs, inspect_outputs, api_visibility="private")
    for trigger in (event, submitted):
        (
            trigger.success(setup_views, state, [notice, position_slider, layer_box, head_box],
                            api_visibility="private")
            .then(show_position, [position_slider, state], position_outputs, api_visibility="private")
            .then(show_attention, [layer_box, head_box, state], [heatmap, grid], api_visibility="private")
        )
    # .change fires on every way of setting the position: dragging, typing plus Enter, the arrow keys, a click
    # on a token, and the reset after a new text (the chain above draws that one too when the value stays)
    position_slider.change(show_position, [position_slider, state], position_outputs, api_name="inspect_position",
                           trigger_mode="always_last", show_progress="hidden")
    tokens.select(choose_token, None, position_slider, api_visibility="private")
    attention_inputs = [layer_box, head_box, state]
    layer_box.change(show_attention, attention_inputs, [heatmap, grid], api_name="attention",
                     trigger_mode="always_last", show_progress="hidden")
    head_box.change(show_attention, attention_inputs, [heatmap, grid], api_visibility="private",
                    trigger_mode="always_last", show_progress="hidden")
