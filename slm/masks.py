"""Attention masks, and the FlexAttention kernel that skips the blocks a sliding window masks out.

A query at position i sees keys j with i - W < j <= i (W keys including itself); global layers are
the same with no window.
"""

from __future__ import annotations

import importlib.util
from functools import cache, lru_cache

import torch


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where a query may attend: causal, and within the window if any."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


@lru_cache(maxsize=32)
def _sliding_causal_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    return window_mask(pos, pos, window)


def sliding_causal_mask(length: int, window: int | None, device: torch.device | str) -> torch.Tensor:
    """The (T, T) causal mask, restricted to a window when one is given; cached per shape and device
    (inside a compiled graph it is built in the graph, where it is folded once)."""
    if torch.compiler.is_compiling():
        return _sliding_causal_mask.__wrapped__(length, window, torch.device(device))
    return _sliding_causal_mask(length, window, torch.device(device))


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def gpu_compiler_available() -> bool:
    """torch.compile needs Triton to generate GPU kernels; without it the compiled GPU paths stay off."""
    return importlib.util.find_spec("triton") is not None


@cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def compiled_flex_attention():
    """FlexAttention compiled once per process: uncompiled it runs a slow reference implementation.
    Inside a graph being compiled (a compiled training step) the plain function is traced into it."""
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention
    return _compiled_flex_attention()


@lru_cache(maxsize=16)
def _sliding_block_mask(length: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def sliding_causal(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


def sliding_block_mask(length: int, window: int, device: torch.device | str):
    """FlexAttention's block mask for a causal sliding window, built once per shape and device
    (inside a compiled graph it is built in the graph)."""
    if torch.compiler.is_compiling():
        return _sliding_block_mask.__wrapped__(length, window, torch.device(device))
    return _sliding_block_mask(length, window, torch.device(device))
