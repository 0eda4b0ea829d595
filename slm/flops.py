"""FLOPs per trained token and the peak throughput of known accelerators, for MFU.

FLOPs per token of training (forward + backward = 3 x forward), counting only useful work:

    6 * (matrix parameters that multiply every token)           the 7 projections of every block and
                                                                 the output head (tied or not; the
                                                                 embedding lookup is not a matmul)
  + 12 * layers * heads * head_dim * (keys a query attends)     QK^T and AV, 2 FLOPs per multiply-add,
                                                                 averaged over the positions of a window

The attention term respects the causal mask and sliding windows: a query at position i of a
length-T sequence attends min(i + 1, W) keys on a sliding layer and i + 1 on a global one. Norms,
rotary, softmax and the loss are left out (well under 1% here). This is the PaLM-style count with
the mask taken into account, so MFU is honest for windowed models rather than flattered by work the
kernel may skip. The vocabulary padding (50257 -> 50304 rows) is not counted either.

MFU = tokens/s * FLOPs per token / (peak FLOP/s of one device * number of devices).
"""

from __future__ import annotations

import re

import torch

from .config import SLIDING, ModelConfig

# Dense (no sparsity) BF16 / FP16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s. Matched in
# order against torch.cuda.get_device_name(); the first pattern that matches wins.
PEAK_FLOPS: list[tuple[str, float]] = [
    (r"\bB200\b", 2250e12),
    (r"\bGH200\b", 989e12),
    (r"\bH200\b", 989e12),
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),  # SXM
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"\bV100\b", 125e12),  # fp16 (no bf16)
    (r"\bT4\b", 65e12),  # fp16 (no bf16)
]


def matmul_parameters(config: ModelConfig) -> int:
    """Weights that take part in a matrix multiplication for every token, the output head included."""
    d, hd = config.hidden_size, config.head_dim
    attention = d * config.num_heads * hd * 2 + d * config.num_kv_heads * hd * 2  # q, o and k, v
    mlp = 3 * d * config.intermediate_size
    head = config.vocab_size * d
    return config.num_layers * (attention + mlp) + head


def mean_keys_attended(seq_len: int, window: int | None) -> float:
    """Average number of keys a query attends over positions 0..seq_len-1 (causal, optional window)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    inside = window * (window + 1) / 2  # positions 0..W-1 attend 1..W keys
    return (inside + (seq_len - window) * window) / seq_len


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of the score and value products, summed over layers."""
    per_key = 12 * config.num_heads * config.head_dim  # 2 products x 2 FLOPs x 3 (forward + backward)
    total = 0.0
    for layer_type in config.layer_types:
        window = config.sliding_window if layer_type == SLIDING else None
        total += per_key * mean_keys_attended(seq_len, window)
    return total


def training_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """FLOPs of one trained token (forward and backward) for sequences of `seq_len` tokens."""
    seq_len = seq_len or config.context_length
    return 6 * matmul_parameters(config) + attention_flops_per_token(config, seq_len)


def peak_flops_for_name(name: str) -> float | None:
    for pattern, flops in PEAK_FLOPS:
        if re.search(pattern, name):
            return flops
    return None


def device_peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16/fp16 peak of one accelerator, or None when unknown (CPUs, unlisted GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if not peak_flops or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * world_size)
