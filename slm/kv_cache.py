"""The preallocated KV cache used for incremental decoding, and the attention masks it needs.

Global layers keep every position. Sliding-window layers keep only the last W positions in a ring
buffer: a query at position i sees keys i - W < j <= i, so older keys can never be used again.
Attention does not care about the order of keys (positions are already rotated into them), so a
single decoded token simply attends to every filled slot of the ring.
"""

from __future__ import annotations

import torch

from .config import SLIDING, ModelConfig
from .masks import window_mask


class LayerKVCache:
    """Keys and values of one layer: (batch, kv_heads, capacity, head_dim), preallocated."""

    def __init__(
        self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, window: int | None,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.window = window
        self.is_ring = window is not None
        self.slots = torch.arange(capacity, device=device)

    def update_at(
        self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store one token at a position held in a tensor and attend over the whole buffer, masked.

        Every shape is fixed and no Python value depends on the position, so a decode step built on
        this can be compiled once and captured in a CUDA graph. Filled slots are exactly those with
        index <= position (once a ring has wrapped, all of them), and all of them are in the window.
        """
        slot = torch.remainder(position, self.capacity).view(1)
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        return self.k, self.v, (self.slots <= position)[None, :]

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store new keys/values for positions start.. and return the keys, values and mask to attend with."""
        T = k.shape[2]
        if not self.is_ring:
            end = start + T
            self.k[:, :, start:end] = k
            self.v[:, :, start:end] = v
            mask = None
            if T > 1:
                mask = window_mask(
                    torch.arange(start, end, device=k.device), torch.arange(end, device=k.device), None
                )
            return self.k[:, :, :end], self.v[:, :, :end], mask

        S = self.capacity
        if T == 1:  # the decoding fast path: every filled slot is inside the window
            slot = start % S
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            filled = min(start + 1, S)
            return self.k[:, :, :filled], self.v[:, :, :filled], None

        # Several new tokens (a prefill or a chunk): attend over the ring's old keys plus the new ones.
        device = k.device
        n_old = min(start, S)
        slots = torch.arange(n_old, device=device)
        old_pos = start - 1 - torch.remainder(start - 1 - slots, S)  # the position each slot holds
        new_pos = torch.arange(start, start + T, device=device)
        keys = torch.cat((self.k[:, :, :n_old], k), dim=2)
        values = torch.cat((self.v[:, :, :n_old], v), dim=2)
        mask = window_mask(new_pos, torch.cat((old_pos, new_pos)), self.window)
        keep = min(T, S)  # only the last S new positions can still be seen later
        write_slots = torch.remainder(new_pos[-keep:], S)
        self.k.index_copy_(2, write_slots, k[:, :, -keep:])
        self.v.index_copy_(2, write_slots, v[:, :, -keep:])
        return keys, values, mask


class KVCache:
    """One `LayerKVCache` per layer and the number of positions already processed."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_length: int, device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        device = torch.device(device)
        self.max_length = max_length
        self.length = 0
        self.layers = []
        for layer_type in config.layer_types:
            window = config.sliding_window if layer_type == SLIDING else None
            capacity = min(window, max_length) if window is not None else max_length
            self.layers.append(
                LayerKVCache(batch_size, config.num_kv_heads, config.head_dim, capacity, window, device, dtype)
            )

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise ValueError(
                f"KV cache full: it holds {self.length} of {self.max_length} positions and "
                f"{new_tokens} more were given"
            )

    def reset(self) -> None:
        self.length = 0
