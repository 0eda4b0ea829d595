"""Logit processing (temperature, top-k, top-p) and generation through the KV cache, streamed.

Generation is a prefill of the whole prompt followed by one cached decode step per new token; the
sampling itself is a few pure functions that the playground also uses to show each step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from .masks import gpu_compiler_available
from .model import Gemma3LM


def check_sampling_params(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError with a clear message for values that have no meaning."""
    if temperature is None or math.isnan(float(temperature)):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if top_k is not None and (not float(top_k).is_integer() or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0 or None disables it), got {top_k!r}")
    if top_p is not None and (math.isnan(float(top_p)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 or None disables it), got {top_p!r}")


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """fp32 logits (..., V) divided by the temperature, with tokens outside top-k / top-p set to -inf.

    temperature <= 0 means greedy: only the most likely token stays.
    """
    check_sampling_params(temperature, top_k, top_p)
    logits = logits.float()
    if temperature <= 0:
        keep = logits == logits.max(dim=-1, keepdim=True).values
        first = keep.float().cumsum(-1) == 1  # one token even when several tie
        return logits.masked_fill(~(keep & first), float("-inf"))
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the first token)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token_probabilities(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution the next token is drawn from, after temperature, top-k and top-p."""
    return torch.softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = next_token_probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_batch(input_ids: Sequence[int] | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, bool]:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids), dtype=torch.long)
    batched = ids.dim() == 2
    ids = ids if batched else ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token")
    return ids.to(device=device, dtype=torch.long), batched


CACHE_BUCKET = 256  # cache lengths are rounded up to this, so a compiled step sees few distinct shapes


class Decoder:
    """A prefill, then one cached step per token.

    With `compiled=True` (the default on CUDA) the step is `model.decode_step` under `torch.compile`:
    fixed shapes, the position passed as a tensor, and on CUDA "reduce-overhead" captures it as a CUDA
    graph so a token costs one graph launch instead of hundreds of kernel launches.
    """

    def __init__(self, model: Gemma3LM, batch_size: int, max_length: int, compiled: bool | None = None) -> None:
        self.model = model
        if compiled is None:
            compiled = model.device.type == "cuda" and gpu_compiler_available()
        self.compiled = compiled
        if self.compiled:
            max_length = math.ceil(max_length / CACHE_BUCKET) * CACHE_BUCKET
        self.cache = model.new_cache(batch_size, max_length)
        if self.compiled:
            for layer in self.cache.layers:
                for tensor in (layer.k, layer.v, layer.slots):
                    torch._dynamo.mark_static_address(tensor)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after the whole prompt."""
        return self.model(ids, cache=self.cache, last_only=True)[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after one more token (B,)."""
        if not self.compiled:
            return self.model(token[:, None], cache=self.cache)[:, -1]
        self.cache.check_room(1)
        position = torch.tensor(self.cache.length, device=token.device)
        step, lock = compiled_decode_step(self.model)
        # One compiled step (a CUDA graph on GPU) serves every request for this model: its static
        # input and output buffers are shared, so concurrent decoders take turns, and the output is
        # copied out before the next replay overwrites it.
        with lock:
            logits = step(token[:, None], position, self.cache).clone()
        self.cache.length += 1
        return logits


_COMPILE_LOCK = threading.Lock()


def compiled_decode_step(model: Gemma3LM) -> tuple[Callable, threading.Lock]:
    """`model.decode_step` compiled once per model (kept on the model so it is reused across
    requests), with the lock that its callers hold while they run it."""
    compiled = getattr(model, "_compiled_decode_step", None)
    if compiled is not None:  # every token after the first: no lock on the hot path
        return compiled
    with _COMPILE_LOCK:  # the first request compiles; concurrent first requests wait for it
        if getattr(model, "_compiled_decode_step", None) is None:
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            step = torch.compile(model.decode_step, mode=mode, fullgraph=True, dynamic=False)
            model._compiled_decode_step = (step, threading.Lock())
        return model._compiled_decode_step


def stream_generate(
    model: Gemma3LM,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    compiled: bool | None = None,
) -> Iterator[int | torch.Tensor]:
    """Yield new tokens one at a time: an int for a 1-D prompt, a (B,) tensor for a (B, T) batch.

    Stops after `max_new_tokens`, or once every row has produced one of `stop_token_ids` (the stop
    token itself is yielded). `compiled` chooses the compiled decode step (default: on CUDA only).
    """
    check_sampling_params(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids, batched = _as_batch(input_ids, model.device)
    if max_new_tokens == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(int(seed))
    stops = torch.tensor(sorted(set(stop_token_ids or ())), dtype=torch.long, device=model.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=model.device)
    decoder = Decoder(model, ids.shape[0], ids.shape[1] + max_new_tokens, compiled)
    # Grad mode is thread-local and a generator may be resumed on another thread (a web server does
    # this), or interleaved with another one, so no context stays open across a `yield`.
    with torch.no_grad():
        logits = decoder.prefill(ids)
    for step in range(max_new_tokens):
        with torch.no_grad():
            token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token if batched else int(token[0])
        if stops.numel():
            finished |= torch.isin(token, stops)
            if bool(finished.all()):
                return
        if step + 1 < max_new_tokens:
            with torch.no_grad():
                logits = decoder.step(token)


def generate(
    model: Gemma3LM,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    compiled: bool | None = None,
) -> list[int] | torch.Tensor:
    """The new token ids (a list for a 1-D prompt, a (B, n) tensor for a batch); temperature 0 is greedy."""
    tokens = list(stream_generate(
        model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, compiled
    ))
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        if not tokens:
            return torch.empty(input_ids.shape[0], 0, dtype=torch.long, device=model.device)
        return torch.stack(tokens, dim=1)
    return tokens
