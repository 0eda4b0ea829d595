"""Logit processing (temperature, top-k, top-p) and generation through the KV cache, streamed.

Generation is a prefill of the whole prompt followed by one cached decode step per new token; the
sampling itself is a few pure functions that the playground also uses to show each step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch

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


def stream_generate(
    model: Gemma3LM,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
) -> Iterator[int | torch.Tensor]:
    """Yield new tokens one at a time: an int for a 1-D prompt, a (B,) tensor for a (B, T) batch.

    Stops after `max_new_tokens`, or once every row has produced one of `stop_token_ids` (the stop
    token itself is yielded).
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
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    with torch.inference_mode():
        logits = model(ids, cache=cache, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            yield token if batched else int(token[0])
            if stops.numel():
                finished |= torch.isin(token, stops)
                if bool(finished.all()):
                    return
            if step + 1 < max_new_tokens:
                logits = model(token[:, None], cache=cache)[:, -1]


def generate(
    model: Gemma3LM,
    input_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
) -> list[int] | torch.Tensor:
    """The new token ids (a list for a 1-D prompt, a (B, n) tensor for a batch); temperature 0 is greedy."""
    tokens = list(stream_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids))
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        if not tokens:
            return torch.empty(input_ids.shape[0], 0, dtype=torch.long, device=model.device)
        return torch.stack(tokens, dim=1)
    return tokens
