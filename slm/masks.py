"""Attention masks from positions.

A query at position i sees keys j with i - W < j <= i (W keys including itself); global layers are
the same with no window. Keys at a negative position are empty cache slots and are never seen.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where a query may attend: causal, and within the window if any."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = (diff >= 0) & (k_pos >= 0)[None, :]
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
