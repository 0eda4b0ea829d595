"""Bits per byte: a loss that models with different tokenizers can be compared on.

A loss in nats per token depends on how much text a token holds; dividing the summed loss by the
UTF-8 bytes the target tokens stand for, in bits, does not.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Summed next-token loss (nats) over some targets -> bits per UTF-8 byte of those targets."""
    if total_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {total_bytes}")
    return total_nats / LN2 / total_bytes


def target_bytes(targets: torch.Tensor, byte_lengths: torch.Tensor, ignore_index: int = -100) -> int:
    """UTF-8 bytes of the text the `targets` ids stand for (`byte_lengths[id]` per token; ignored ids count 0)."""
    valid = targets != ignore_index
    ids = torch.where(valid, targets, torch.zeros_like(targets)).to(byte_lengths.device)
    return int((byte_lengths[ids] * valid.to(byte_lengths.device)).sum().item())


def bpb_from_mean_loss(mean_loss: float, tokens: int, total_bytes: int) -> float:
    """Bits per byte from a mean loss over `tokens` targets that hold `total_bytes` bytes:
    loss / ln 2 * tokens / bytes."""
    return bits_per_byte(mean_loss * tokens, total_bytes)
