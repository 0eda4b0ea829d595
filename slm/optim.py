"""Optimizers and the learning-rate schedule, and their state as safetensors + JSON (never pickles)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .model import Gemma3LM
from .train_config import TrainConfig

FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over `warmup_steps` steps up to
    `lr`, then a cosine from `lr` at step `warmup_steps` down to `min_lr` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizers(model: Gemma3LM, config: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW (one fused kernel on CPU and CUDA) with weight decay on matrices only; with `optimizer="muon"`, Muon takes
    the 2-D matrices inside the blocks and AdamW the embedding and norms.

    Every parameter group remembers its peak learning rate as `base_lr`; the schedule scales it.
    """
    named = list(model.named_parameters())
    muon_params = []
    if config.optimizer == "muon":
        muon_params = [p for n, p in named if p.ndim == 2 and n.startswith("layers.")]
    taken = {id(p) for p in muon_params}
    rest = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = config.lr
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(
            groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
            # fused: one pass over each tensor (on a CPU, 4-10x faster than the per-tensor loop)
            fused=True if device.type in FUSED_ADAMW_DEVICES else None,
        )
    ]
    if muon_params:
        # "match_rms_adamw" scales each update to AdamW's RMS, so one learning rate serves both.
        muon = torch.optim.Muon(
            muon_params, lr=config.lr, weight_decay=config.weight_decay, momentum=0.95, nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        for g in muon.param_groups:
            g["base_lr"] = config.lr
        optimizers.append(muon)
    return optimizers


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def optimizer_state_to_files(
    optimizers: list[torch.optim.Optimizer],
) -> tuple[dict[str, torch.Tensor], list[list[dict[str, Any]]]]:
    """Optimizer state as flat safetensors tensors plus JSON-able parameter groups."""
    tensors: dict[str, torch.Tensor] = {}
    groups: list[list[dict[str, Any]]] = []
    for k, optimizer in enumerate(optimizers):
        state = optimizer.state_dict()
        for param_id, values in state["state"].items():
            for name, value in values.items():
                tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optimizer.{k}.{param_id}.{name}"] = tensor.detach().to("cpu").contiguous()
        groups.append([{k2: list(v) if isinstance(v, tuple) else v for k2, v in g.items()}
                       for g in state["param_groups"]])
    return tensors, groups


def optimizer_state_from_files(
    optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], groups: list[list[dict[str, Any]]]
) -> None:
    if len(groups) != len(optimizers):
        raise ValueError(
            f"the saved training state has {len(groups)} optimizer(s), this run builds {len(optimizers)}: "
            "was the optimizer changed?"
        )
    for k, optimizer in enumerate(optimizers):
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"optimizer.{k}."
        for key, tensor in tensors.items():
            if key.startswith(prefix):
                param_id, name = key[len(prefix):].split(".", 1)
                state.setdefault(int(param_id), {})[name] = tensor
        param_groups = [{name: _tuples(v) if name != "params" else v for name, v in g.items()} for g in groups[k]]
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
