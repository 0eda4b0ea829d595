"""One attention signature and a small table of backends behind it.

Every backend is called as `attend(q, k, v, mask=..., window=..., scale=...)` with queries
(B, H, Tq, D) and keys/values (B, Hkv, Tk, D), and returns `(output (B, H, Tq, D), weights or None)`.
`mask` is a boolean (Tq, Tk) mask built from positions, or None for plain causal attention over a
full sequence. A call site (the model's forward, its loss, `trace`) picks a backend once by name:

- "sdpa":  `F.scaled_dot_product_attention`, causal or with the given mask (inference, scoring);
- "flex":  FlexAttention with a sliding-window block mask that skips the blocks outside the window;
           for full training sequences only, whose lengths are fixed, so it compiles once per shape;
- "eager": attention written out, also returning the fp32 probabilities (inspection).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache, lru_cache

import torch
import torch.nn.functional as F

from .masks import sliding_causal_mask

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, window: int | None,
    scale: float,
) -> tuple[torch.Tensor, None]:
    """SDPA; `mask` None means causal (the caller passes a mask whenever a window can bind)."""
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out, None


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, window: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, returning the fp32 probabilities (B, H, Tq, Tk) for inspection."""
    if mask is None:
        mask = sliding_causal_mask(q.shape[2], None, q.device)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v), probs


@cache
def triton_available() -> bool:
    """torch.compile needs Triton to generate GPU kernels; without it the compiled GPU paths stay off."""
    return importlib.util.find_spec("triton") is not None


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=16)
def _sliding_block_mask(length: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_causal(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, window: int | None,
    scale: float,
) -> tuple[torch.Tensor, None]:
    """FlexAttention for a full training sequence; layers whose window cannot bind take SDPA.

    Compiled once per process (uncompiled it runs a slow reference implementation); inside a graph
    being compiled (a compiled training step) the plain function and its block mask are traced in.
    """
    T = q.shape[2]
    if window is None or window >= T or q.shape[2] != k.shape[2]:
        return sdpa_attention(q, k, v, mask=mask, window=window, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention as flex

    if torch.compiler.is_compiling():
        block_mask = _sliding_block_mask.__wrapped__(T, window, q.device)
        fn = flex
    else:
        block_mask, fn = _sliding_block_mask(T, window, q.device), _compiled_flex_attention()
    out = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out, None


BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention, "flex": flex_attention, "eager": eager_attention}


def attention_backend(name: str) -> AttentionFn:
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {tuple(BACKENDS)}, got {name!r}")
    return BACKENDS[name]
