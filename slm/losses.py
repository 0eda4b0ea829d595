"""Cross-entropy fused with the output projection, computed in row chunks.

For a 50k vocabulary the logits dwarf every other activation: batch 16 x 1024 tokens is 3.3 GB in
fp32, and autograd would keep them (and their gradient) alive. Here each chunk of rows is projected,
its loss and its gradients are computed at once, and the chunk's logits are dropped: peak memory is
one chunk, and backward is two multiplications by a scalar.

Mixed precision: under autocast the hidden states and the vocabulary matrix are cast to the autocast
dtype once per call (outside the function, so autograd carries the gradient back to the fp32
weights), and autocast is off inside, where nothing would otherwise stop a re-cast per chunk. The
gradients computed in forward are kept in fp32 and multiplied by the incoming gradient in backward:
that is where a GradScaler's loss scale arrives, so an fp16 gradient is formed only after scaling
(unscaled, d(mean loss)/d(hidden) is ~1/N and underflows fp16). The padded vocabulary columns are
masked to -inf rather than sliced off, so every GEMM keeps the padded, aligned width.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 25  # ~32M logits (128 MB in fp32) per chunk


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, ignore_index, need_grad):  # type: ignore[override]
        n_rows = hidden.shape[0]
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = _chunk_rows(weight.shape[0])
        for lo in range(0, n_rows, step):
            h = hidden[lo : lo + step]
            t = safe_targets[lo : lo + step]
            row_weight = valid[lo : lo + step].float() / n_valid  # 1 / n_valid, or 0 for ignored rows
            logits = (h @ weight.t()).float()
            logits[:, vocab_size:] = float("-inf")  # padding columns: probability 0, gradient 0
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # The softmax is built in the logits' own buffer: one exp pass serves the loss and the gradient.
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            total = probs.sum(dim=-1)
            lse = total.log() + row_max.squeeze(1)
            loss += ((lse - target_logit) * row_weight).sum()
            if need_grad:
                # d(mean loss)/d(logits) = (softmax - onehot) / n_valid on valid rows, zero elsewhere
                grad_logits = probs.mul_((row_weight / total)[:, None])
                grad_logits[torch.arange(len(t), device=t.device), t] -= row_weight
                if weight.dtype == torch.float32:
                    grad_hidden[lo : lo + step] = grad_logits @ weight
                    torch.addmm(grad_weight, grad_logits.t(), h.float(), out=grad_weight)  # out=: FLOP counters see it
                else:
                    # fp16/bf16 GEMMs: grad_logits times n_valid lies in [-1, 1], where fp16 keeps its
                    # precision (divided by n_valid it would underflow); the factor comes off in fp32
                    g = (grad_logits * n_valid).to(weight.dtype)
                    grad_hidden[lo : lo + step] = (g @ weight).float() / n_valid
                    grad_weight += (g.t() @ h).float() / n_valid
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_output).to(hidden_dtype), (grad_weight * grad_output).to(weight_dtype),
                None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int = -100
) -> torch.Tensor:
    """mean over non-ignored rows of cross_entropy(hidden @ weight[:vocab_size].T, targets).

    `hidden` is (N, d), `weight` is (padded_vocab, d); rows of the weight past `vocab_size` are padding
    and take no part. Equals `F.cross_entropy` on the full logits within floating-point tolerance.
    Under autocast both are cast once to the autocast dtype here, and autocast is off inside.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, ignore_index, need_grad)
