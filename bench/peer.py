"""The peer the quality judge compares against: transformers' Gemma3ForCausalLM of the same size as
our default `tiny`, trained on the same tokens by a plain loop (AdamW, batch 8 x 256, linear warmup
then cosine to lr/10, weight decay 0.1, gradient clip 1.0) for a token or a wall-clock budget.

With a time budget the cosine follows the elapsed share of the budget, as ours does, and the budget
counts the whole wall time of the loop, as ours does; the final held-out scoring comes after it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench.heldout import heldout_score
from slm.data import BatchSampler, prepare_data
from slm.hf import config_to_hf
from slm.tokenizer import load_tokenizer
from slm.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "tinystories"
TRAIN_FILE, VAL_FILE = SHARED / "train-first-2315.txt", SHARED / "valid-first-1000.txt"
BATCH, CONTEXT, WARMUP = 8, 256, 20


def build_peer(seed: int) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    ours = TrainConfig().model_config()  # the size of our default model
    ours.context_length = CONTEXT
    values = config_to_hf(ours)
    # transformers' own initialisation (initializer_range 0.02), not the one tuned for our recipe
    for key in ("architectures", "model_type", "torch_dtype", "dtype", "initializer_range"):
        values.pop(key)
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(**values)).float()


def train_peer(lr: float, tokens: int | None, seconds: float | None, val_limit: int | None = None,
               seed: int = 1337, betas: tuple[float, float] = (0.9, 0.95)) -> dict[str, Any]:
    """Train the peer for `tokens` or `seconds`; returns the same fields as the sweep's rows."""
    model = build_peer(seed)
    config = TrainConfig(data=str(TRAIN_FILE), val_data=str(VAL_FILE), cache_dir=str(REPO / ".cache" / "slm-data"))
    data = prepare_data(config.data_spec(), load_tokenizer(), config.cache_dir)
    sampler = BatchSampler(data.train, BATCH, CONTEXT, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.1)
    max_steps = math.ceil(tokens / (BATCH * CONTEXT)) if tokens else None
    load_before = "/".join(f"{v:.1f}" for v in os.getloadavg())
    model.train()
    started = time.perf_counter()
    step, step_seconds = 0, 0.0
    while True:
        elapsed = time.perf_counter() - started
        if seconds is not None:
            last = elapsed + 2 * step_seconds >= seconds
            progress = 1.0 if last else (elapsed + step_seconds) / seconds
        else:
            last = step == max_steps - 1
            progress = (step - WARMUP) / max(1, max_steps - 1 - WARMUP)
        factor = (step + 1) / WARMUP if step < WARMUP else 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        t0 = time.perf_counter()
        inputs, targets = sampler.next_batch()
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=inputs).logits.flatten(0, 1).float(), targets.flatten()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        step_seconds = dt if step == 1 else 0.7 * step_seconds + 0.3 * dt
        if last:
            break
    wall = time.perf_counter() - started
    model.eval()
    loss, bpb = heldout_score(lambda x: model(input_ids=x).logits, VAL_FILE, CONTEXT, limit=val_limit)
    return {"tokens": step * BATCH * CONTEXT, "steps": step, "seconds": wall,
            "tokens_per_s": step * BATCH * CONTEXT / wall, "loss": loss, "bpb": bpb,
            "load": f"{load_before} -> {'/'.join(f'{v:.1f}' for v in os.getloadavg())}", "run_dir": None}
