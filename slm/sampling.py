"""SamplingParams, and pure logit processing: temperature, top-k, top-p, and the draw itself.

A sampling setting is a field of `SamplingParams`, checked once where the value is made, and passed
whole from the UI and API to the sampler: a new sampling method touches this file only. The draw
needs no host sync: `argmax(p / q)` with q ~ Exp(1) from a device generator picks token i with
probability p_i (the "exponential race"), where `torch.multinomial` would synchronise.
Generation itself (prefill, cached decode steps, compiled or not) lives in `engine.py`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy: logits / 1e-38 would overflow to inf
SEED_MODULUS = 2**63  # any integer seed is accepted and reduced modulo 2**63 (torch seeds are 64-bit)
NAN_TOKEN = -1  # what a draw from NaN logits gives, so the caller can say so without an extra sync


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Built once (values checked here, with clear messages), then passed whole.

    temperature <= 1e-5 is greedy; top_k 0/None and top_p 1/None are off; a seed makes draws
    reproducible (any integer, reduced modulo 2**63); `stop_ids` end generation once produced.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        temperature = _number(self.temperature, "temperature")
        if math.isinf(temperature):
            raise ValueError(f"temperature must be finite, got {self.temperature!r}")
        top_k = self.top_k
        if top_k is not None:
            if isinstance(top_k, bool) or not _is_integer(top_k) or top_k < 0:
                raise ValueError(f"top_k must be a non-negative integer (0 or None disables it), got {top_k!r}")
            top_k = int(top_k) or None
        top_p = self.top_p
        if top_p is not None:
            top_p = _number(top_p, "top_p")
            if not 0.0 < top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1] (1 or None disables it), got {self.top_p!r}")
            top_p = None if top_p == 1.0 else top_p
        seed = self.seed
        if seed is not None:
            if isinstance(seed, bool) or not _is_integer(seed):
                raise ValueError(f"seed must be a whole number, got {seed!r}")
            seed = int(seed) % SEED_MODULUS
        stop_ids = tuple(int(t) for t in (self.stop_ids or ()))
        object.__setattr__(self, "temperature", 0.0 if temperature < GREEDY_BELOW else temperature)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "stop_ids", stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def generator(self, device: torch.device | str, offset: int = 0) -> torch.Generator | None:
        """A generator on `device` seeded with seed + offset (None without a seed)."""
        return make_generator(None if self.seed is None else self.seed + offset, device)


def _is_integer(value: object) -> bool:
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer()


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A torch.Generator for any integer seed (reduced modulo 2**63, never an overflow error)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) % SEED_MODULUS)
    return generator


def as_params(
    params: SamplingParams | None = None, *, temperature: float | None = None, top_k: int | None = None,
    top_p: float | None = None, seed: int | None = None, stop_token_ids: Iterable[int] | None = None,
) -> SamplingParams:
    """`params`, or SamplingParams from the keyword form (not both)."""
    keywords = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed, "stop_ids": stop_token_ids}
    given = {k: v for k, v in keywords.items() if v is not None}
    if params is not None:
        if given:
            raise ValueError(f"pass sampling settings as SamplingParams or as keywords, not both: {sorted(given)}")
        return params
    if "stop_ids" in given:
        given["stop_ids"] = tuple(given["stop_ids"])
    return SamplingParams(**given)


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """fp32 logits (..., V) divided by the temperature, with tokens outside top-k / top-p set to -inf.

    temperature <= 1e-5 means greedy: only the most likely token stays.
    """
    return apply_params(logits, SamplingParams(temperature, top_k, top_p))


def apply_params(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`process_logits` for a SamplingParams value."""
    logits = logits.float()
    if params.greedy:
        keep = logits == logits.max(dim=-1, keepdim=True).values
        first = keep.float().cumsum(-1) == 1  # one token even when several tie
        return logits.masked_fill(~(keep & first), float("-inf"))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the first token)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token_probabilities(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution the next token is drawn from, after temperature, top-k and top-p."""
    return torch.softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, V), on the logits' device, with no host sync.

    Rows whose logits hold NaN give NAN_TOKEN (-1), which the caller turns into a clear error.
    """
    if params.greedy:
        token = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(apply_params(logits, params), dim=-1)
        race = torch.empty_like(probs).exponential_(generator=generator)
        token = (probs / race).argmax(dim=-1)
    return torch.where(torch.isnan(logits).any(dim=-1), NAN_TOKEN, token)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V): `sample` in the keyword form."""
    return sample(logits, SamplingParams(temperature, top_k, top_p), generator)


def __getattr__(name: str):
    """`generate` and `stream_generate` live in engine.py; these names keep older imports working."""
    if name in ("generate", "stream_generate"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
