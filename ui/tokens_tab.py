"""Tokens tab: how the tokenizer cuts a text into tokens, with their ids and bytes.

The first thing a lecture on language models shows: the model never sees letters, only these ids.
Updates as the text changes; the tokenizer is the one of the model chosen in the picker.
"""

from __future__ import annotations

import gradio as gr

from slm import Tokenizer

from .common import user_errors
from .models import ModelPicker
from .step_tab import show_token

DEFAULT_TEXT = "Once upon a time, there was a little girl named Lily.\nShe said: \"Wow, a café!\""
MAX_CHARACTERS = 20_000  # a text this long is tokenized in milliseconds; the table would not be read anyway
SHADES = ("even", "odd")  # neighbouring tokens in two colours, so each token's edges show


def token_rows(tokenizer: Tokenizer, text: str) -> tuple[list[tuple[str, str]], list[list], str, list[int]]:
    """(highlighted pieces, table rows, summary, ids) for `text`."""
    ids = tokenizer.encode(text)
    strings = tokenizer.token_strings(ids)
    pieces = [(s, SHADES[i % 2]) for i, s in enumerate(strings)]
    rows = [
        [i, show_token(s), token_id, " ".join(f"{b:02x}" for b in tokenizer.token_bytes(token_id))]
        for i, (s, token_id) in enumerate(zip(strings, ids, strict=True))
    ]
    size = len(text.encode())
    summary = (
        f"**{len(text):,} characters ({size:,} bytes) → {len(ids):,} tokens**"
        + (f" · {size / len(ids):.1f} bytes per token" if ids else "")
        + f" · vocabulary of {tokenizer.vocab_size:,} tokens. ␣ is a space, ↵ a new line; a character that "
        "takes several bytes (like an emoji) can be split across tokens, shown as \\x.. escapes."
    )
    return pieces, rows, summary, ids


def build_tokens_tab(picker: ModelPicker, tab: gr.Tab) -> None:
    with gr.Row():
        text_box = gr.Textbox(DEFAULT_TEXT, lines=3, label="Text", scale=5, elem_id="tokens-text",
                              elem_classes=["big-text"])
        run = gr.Button("Tokenize", variant="primary", scale=1, min_width=120, elem_id="tokens-button")
    summary = gr.Markdown(elem_id="tokens-summary")
    pieces = gr.HighlightedText(
        label="Tokens (alternating colours mark where one ends and the next begins)",
        color_map={SHADES[0]: "#9ec5fe", SHADES[1]: "#ffd59e"}, show_legend=False, show_inline_category=False,
        combine_adjacent=False, elem_id="tokens-pieces", elem_classes=["big-text"],
    )
    ids_box = gr.Textbox(label="Token ids (what the model reads)", lines=2, elem_id="tokens-ids",
                         elem_classes=["big-text"])
    table = gr.Dataframe(headers=["position", "token", "id", "bytes (hex)"],
                         datatype=["number", "str", "number", "str"], label="Every token",
                         interactive=False, max_height=420, elem_id="tokens-table")

    @user_errors
    def tokenize(text: str, model_key: str | None):
        text = text or ""
        if len(text) > MAX_CHARACTERS:
            raise gr.Error(f"The text has {len(text):,} characters; this view shows up to {MAX_CHARACTERS:,}.")
        tokenizer = picker.registry.get(model_key).tokenizer  # the chosen model's own tokenizer
        highlighted, rows, note, ids = token_rows(tokenizer, text)
        return note, highlighted, " ".join(map(str, ids)), rows

    inputs, outputs = [text_box, picker.state], [summary, pieces, ids_box, table]
    run.click(tokenize, inputs, outputs, api_name="tokenize")
    text_box.change(tokenize, inputs, outputs, api_visibility="private", trigger_mode="always_last",
                    show_progress="hidden")
    tab.select(tokenize, inputs, outputs, api_visibility="private")
    picker.state.change(tokenize, inputs, outputs, api_visibility="private")
    text_box.submit(tokenize, inputs, outputs, api_visibility="private")
