"""The preallocated KV cache, with one update path for prefill and decode.

Global layers keep every position; sliding-window layers keep the last W positions in a ring
buffer (a query at i sees keys i - W < j <= i, so older keys are never used again). Every slot
remembers the position it holds (-1: empty), and attention masks are computed from those positions,
so keys need no order and a decoded token attends over the whole fixed-size buffer: shapes do not
depend on the position, which is what lets the engine compile the decode step once.
"""

from __future__ import annotations

import torch

from .config import SLIDING, ModelConfig


class LayerKVCache:
    """Keys and values of one layer: (batch, kv_heads, capacity, head_dim), preallocated."""

    def __init__(
        self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, window: int | None,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.capacity = capacity
        self.window = window
        self.is_ring = window is not None

    def update(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store keys/values (B, Hkv, T, D) for `positions` (T,), a tensor, and return what to attend
        over: keys, values and each key's position (the mask is built from those).

        The slots are `positions % capacity`, written with `index_copy_`. A chunk of several tokens
        written into a ring could overwrite keys its own first queries still need, so there the
        queries attend over the old buffer and the new keys side by side (written afterwards).
        """
        T = k.shape[2]
        keep = min(T, self.capacity)  # only the last `capacity` new positions can be seen later
        slots = torch.remainder(positions[-keep:], self.capacity)
        if self.is_ring and T > 1:
            keys, values = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
            key_positions = torch.cat((self.positions, positions))
        else:
            keys, values, key_positions = self.k, self.v, self.positions
        self.k.index_copy_(2, slots, k[:, :, -keep:])
        self.v.index_copy_(2, slots, v[:, :, -keep:])
        self.positions.index_copy_(0, slots, positions[-keep:])
        return keys, values, key_positions

    def reset(self) -> None:
        self.positions.fill_(-1)


class KVCache:
    """One `LayerKVCache` per layer and the number of positions already processed."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_length: int, device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        device = torch.device(device)
        self.batch_size = batch_size
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
        """Forget what the cache holds (a device op: the buffers are reused, not reallocated)."""
        self.length = 0
        for layer in self.layers:
            layer.reset()
