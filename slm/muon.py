"""Muon: momentum SGD whose update for each weight matrix is orthogonalised by a Newton–Schulz
iteration, so every direction of the matrix moves at the same rate (K. Jordan et al., 2024).

Ours rather than `torch.optim.Muon` because that one always iterates in bf16, which a CPU without bf16
arithmetic (AVX2) emulates: there it took 980 ms of a 1.5 s `tiny` step, where fp32 takes a few tens
of milliseconds. `slm.optim.build_optimizers` picks the iteration's dtype with the run's precision: bf16 where
the run trains in bf16 (CUDA tensor cores, CPUs with AVX512-BF16 or AMX: about half the time of
fp32 there), fp32 otherwise. Matrices of one shape are orthogonalised together in one
batched product. Hyperparameter names and the optimizer state ("momentum_buffer") match torch's, so a
run saved with either resumes with the other.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch

# The quintic iteration's coefficients, chosen for the steepest slope at zero (Jordan's Muon): the
# singular values land near 1 (within about 0.7-1.2) after five steps rather than exactly on it.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(matrices: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U Vᵀ for each matrix U S Vᵀ in `matrices` (..., rows, cols), computed in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    shape = matrices.shape
    x = matrices.to(dtype).reshape(-1, *shape[-2:])
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        # x <- a x + (b gram + c gram^2) x, the sums fused into the products: fewer passes, fewer roundings
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.mT).reshape(shape)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights. The step of a (rows x cols) matrix is scaled by 0.2·sqrt(max(rows, cols)),
    which gives it the RMS of an AdamW update: `lr` reads like an AdamW learning rate (torch's
    `adjust_lr_fn="match_rms_adamw"`). Weight decay is decoupled, `lr * weight_decay` per step."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float = 1e-2,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = NS_STEPS, ns_dtype: torch.dtype = torch.float32) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(f"invalid Muon settings: lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}, ns_steps={ns_steps}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # the Newton-Schulz iteration's dtype (not a group field: groups are saved as JSON)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon updates 2-D weight matrices only, got a tensor of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape: dict[tuple, list[tuple[torch.nn.Parameter, torch.Tensor]]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                by_shape[(tuple(p.shape), p.device)].append((p, update))
            for (shape, _device), items in by_shape.items():
                updates = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"], self.ns_dtype)
                step_size = lr * 0.2 * math.sqrt(max(shape))
                for (p, _), update in zip(items, updates, strict=True):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update.to(p.dtype), alpha=-step_size)
        return loss
