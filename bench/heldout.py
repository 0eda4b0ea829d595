"""Held-out loss and bits per byte of a model on a text file, for the quality benchmarks.

The validation text is tokenized once (stories joined by end-of-text) and cut into non-overlapping
windows of the context length; every token of those windows is scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from slm.data import iter_file_stories
from slm.metrics import bits_per_byte
from slm.tokenizer import load_tokenizer


@cache
def heldout_tokens(val_file: str, limit: int | None = None) -> torch.Tensor:
    tokenizer = load_tokenizer()
    ids: list[int] = []
    for story in tokenizer.encode_batch(list(iter_file_stories(Path(val_file)))):
        ids += [*story, tokenizer.eot_id]
        if limit is not None and len(ids) > limit:
            break
    return torch.tensor(ids[: limit + 1] if limit is not None else ids, dtype=torch.long)


@torch.no_grad()
def heldout_score(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], val_file: Path, context: int, batch: int = 16,
    limit: int | None = None,
) -> tuple[float, float]:
    """(mean loss in nats, bits per byte) of a model over the held-out text; `logits_fn(inputs)` -> logits."""
    tokens = heldout_tokens(str(val_file), limit)
    byte_lengths = load_tokenizer().token_byte_lengths()
    windows = (tokens.numel() - 1) // context
    inputs = tokens[: windows * context].view(windows, context)
    targets = tokens[1 : windows * context + 1].view(windows, context)
    total_nats = 0.0
    for lo in range(0, windows, batch):
        x, y = inputs[lo : lo + batch], targets[lo : lo + batch]
        logits = logits_fn(x).float()
        total_nats += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        ).item()
    total_bytes = int(byte_lengths[targets].sum())
    loss = total_nats / targets.numel()
    return loss, bits_per_byte(total_nats, total_bytes) if total_bytes else math.nan
