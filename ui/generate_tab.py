"""Generate tab: streamed generation through the KV cache, and greedy beside sampled."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import gradio as gr

from slm import Gemma3LM, Tokenizer
from slm.engine import stream_generate
from slm.inspection import fit_to_length
from slm.sampling import SamplingParams

from .common import gpu, integer, number, user_errors
from .models import ModelPicker

DEFAULT_PROMPT = "Once upon a time, there was a little"
MAX_NEW_TOKENS = 1024


@dataclass
class SamplingSettings:
    max_new_tokens: int
    params: SamplingParams  # passed whole to the sampler

    @property
    def greedy(self) -> bool:
        return self.params.greedy


def read_settings(max_new_tokens, temperature, top_k, top_p, seed, vocab_size: int) -> SamplingSettings:
    """Check the sliders (the API can send anything, NaN included) and say clearly what is wrong."""
    top_k = integer(top_k if top_k is not None else 0, "top-k", 0, vocab_size)
    top_p = number(top_p if top_p is not None else 1.0, "top-p", 0.0, 1.0)
    if top_p == 0:
        raise gr.Error("top-p must be above 0 (1 turns it off): with 0 no token could ever be drawn.")
    seed = None if seed is None or seed == "" else integer(seed, "seed", -1, 2**63 - 1)
    params = SamplingParams(
        temperature=number(temperature, "temperature", None, 100.0),
        top_k=top_k or None,
        top_p=top_p if top_p < 1 else None,
        seed=None if seed is None or seed < 0 else seed,
    )
    return SamplingSettings(integer(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS), params)


def prepare_prompt(
    tokenizer: Tokenizer, model: Gemma3LM, prompt: str, max_new_tokens: int, chat: bool = False
) -> tuple[list[int], int, int]:
    """Prompt ids, the number of new tokens and the number of prompt tokens dropped, fitted into the context.

    Prompt and new tokens must fit into the context together. The prompt keeps up to half of it
    (its last tokens) and the new tokens get the rest, fewer than asked only when both do not fit.
    An empty prompt starts a story from the end-of-text token. With `chat`, the prompt becomes a user
    turn in the tokenizer's chat template (for instruction-tuned models).
    """
    context = model.config.context_length
    if chat and not tokenizer.chat_template:
        raise gr.Error("This model's tokenizer has no chat template (it is a base model, not an instruction-tuned "
                       "one): turn the chat template off.")
    ids = tokenizer.encode_chat(prompt or "") if chat else tokenizer.encode(prompt or "")
    if not ids:
        gr.Warning("The prompt is empty: the model starts a story from scratch (from the end-of-text token).")
        ids = [tokenizer.eot_id]
    room = context - min(len(ids), context // 2)
    if max_new_tokens > room:
        gr.Warning(f"This model's context holds {context} tokens: generating {room} new tokens, not {max_new_tokens}.")
        max_new_tokens = room
    bos = [ids[0]] if tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id else []
    ids, dropped = fit_to_length(ids, context - max_new_tokens)
    if dropped and bos:  # a vocabulary with BOS was trained with it first: keep it in front
        ids = bos + ids[1:]
    if dropped:
        gr.Warning(
            f"The prompt is longer than the room left in the {context}-token context: "
            f"its first {dropped} tokens were dropped and the last {len(ids)} kept."
        )
    return ids, max_new_tokens, dropped


def stream_text(
    model: Gemma3LM, tokenizer: Tokenizer, ids: list[int], settings: SamplingSettings, greedy: bool = False,
    compiled: bool | None = None,
) -> Iterator[tuple[str, int]]:
    """(new text so far, tokens so far) after every token; stops at end-of-text (or end of turn).
    `compiled=False` keeps torch.compile out (ZeroGPU does not support it); None lets the engine choose."""
    decoder = tokenizer.stream_decoder()
    text, count = "", 0
    stops = tokenizer.stop_ids
    params = replace(settings.params, stop_ids=tuple(stops), **({"temperature": 0.0} if greedy else {}))
    tokens = stream_generate(model, ids, settings.max_new_tokens, params, compiled=compiled)
    for token in tokens:
        count += 1
        if token in stops:
            break
        text += decoder.push(token)
        yield text, count
    yield text + decoder.flush(), count


def speed(count: int, seconds: float, prompt_tokens: int, dropped: int, done: bool) -> str:
    """The status line under the text (the API returns it too, so it also carries the truncation notice)."""
    rate = count / seconds if seconds > 0 else 0.0
    prompt = f"prompt {prompt_tokens} tokens"
    if dropped:
        prompt += f" (its first {dropped} tokens dropped to fit the context)"
    return f"**{count} new tokens** · {rate:.1f} tokens/s · {prompt} · {'done' if done else 'generating…'}"


def sampling_controls(max_new_default: int = 120) -> tuple[gr.components.Component, ...]:
    """Max new tokens, temperature, top-k, top-p and seed: the same five controls in every tab that samples."""
    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=max_new_default, step=1, label="Max new tokens")
    temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature", info="0 = greedy")
    top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k", info="0 = off")
    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.01, label="Top-p", info="1 = off")
    seed = gr.Number(value=0, precision=0, label="Seed", info="-1 = a different draw every time")
    return max_new, temperature, top_k, top_p, seed


def stopped(stats: str | None) -> str:
    """The status line once Stop was pressed: the generation is over, so it no longer says 'generating…'."""
    return (stats or "").replace("generating…", "stopped") or "stopped"


def build_generate_tab(picker: ModelPicker) -> None:
    registry = picker.registry
    compiled = False if registry.settings.zero_gpu else None  # ZeroGPU: no torch.compile
    with gr.Row():
        with gr.Column(scale=3):
            prompt_box = gr.Textbox(DEFAULT_PROMPT, lines=3, label="Prompt", elem_id="generate-prompt")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                stop = gr.Button("Stop", elem_id="generate-stop")
                compare_button = gr.Button("Greedy vs sampled", elem_id="compare-button")
            output = gr.Textbox(lines=10, label="Text (prompt + generated)", elem_id="generate-output",
                                elem_classes=["big-text"])
            stats = gr.Markdown(elem_id="generate-stats")
        with gr.Column(scale=1):
            controls = sampling_controls()
            chat_box = gr.Checkbox(False, label="Chat template", elem_id="generate-chat",
                                   info="instruction-tuned (-it) models: the prompt becomes a user turn")
    gr.Markdown("### Greedy beside sampled: the same prompt, the most likely token every time vs a draw")
    with gr.Row():
        greedy_out = gr.Textbox(lines=8, label="Greedy (temperature 0)", elem_id="greedy-output",
                                elem_classes=["big-text"])
        sampled_out = gr.Textbox(lines=8, label="Sampled (your settings)", elem_id="sampled-output",
                                 elem_classes=["big-text"])

    @gpu
    @user_errors
    def generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, model_key):
        prompt = prompt or ""
        lm = registry.get(model_key)
        model, tokenizer = lm.model, lm.tokenizer
        settings = read_settings(max_new_tokens, temperature, top_k, top_p, seed, tokenizer.vocab_size)
        if settings.greedy:
            gr.Info("Temperature 0: greedy decoding, the most likely token every time.")
        ids, settings.max_new_tokens, dropped = prepare_prompt(tokenizer, model, prompt, settings.max_new_tokens,
                                                               bool(chat))
        start = time.perf_counter()
        yield prompt, speed(0, 0.0, len(ids), dropped, False)
        for new_text, count in stream_text(model, tokenizer, ids, settings, compiled=compiled):
            yield prompt + new_text, speed(count, time.perf_counter() - start, len(ids), dropped, False)
        yield prompt + new_text, speed(count, time.perf_counter() - start, len(ids), dropped, True)

    @gpu
    @user_errors
    def compare(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat, model_key):
        prompt = prompt or ""
        lm = registry.get(model_key)
        model, tokenizer = lm.model, lm.tokenizer
        settings = read_settings(max_new_tokens, temperature, top_k, top_p, seed, tokenizer.vocab_size)
        if settings.greedy:
            gr.Warning("Temperature is 0, which is greedy too: the sampled side uses temperature 1.")
            settings.params = replace(settings.params, temperature=1.0)
        ids, settings.max_new_tokens, _ = prepare_prompt(tokenizer, model, prompt, settings.max_new_tokens, bool(chat))
        greedy_text = sampled_text = ""
        pairs = itertools.zip_longest(
            stream_text(model, tokenizer, ids, settings, greedy=True, compiled=compiled),
            stream_text(model, tokenizer, ids, settings, compiled=compiled),
        )
        for greedy_step, sampled_step in pairs:
            greedy_text = greedy_step[0] if greedy_step else greedy_text
            sampled_text = sampled_step[0] if sampled_step else sampled_text
            yield prompt + greedy_text, prompt + sampled_text

    inputs = [prompt_box, *controls, chat_box, picker.state]
    event = run.click(generate, inputs, [output, stats], api_name="generate", concurrency_limit=4)
    submitted = prompt_box.submit(generate, inputs, [output, stats], api_visibility="private", concurrency_limit=4)
    compared = compare_button.click(compare, inputs, [greedy_out, sampled_out], api_name="compare",
                                    concurrency_limit=4)
    stop.click(stopped, stats, stats, cancels=[event, submitted, compared], api_visibility="private")
