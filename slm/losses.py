"""Cross-entropy fused with the output projection, computed in row chunks.

For a 50k vocabulary the logits dwarf every other activation: batch 16 x 1024 tokens is 3.3 GB in
fp32, and autograd would keep them (and their gradient) alive. Here each chunk of rows is projected,
its loss and its gradients are computed at once, and the chunk's logits are dropped: peak memory is
one chunk, and backward is two multiplications by a scalar.
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
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = _chunk_rows(weight.shape[0])
        # the gradients' matmuls run in the hidden states' dtype (cast once, not once per chunk)
        vocab_weight = weight[:vocab_size].to(hidden.dtype) if need_grad else None
        for lo in range(0, n_rows, step):
            h = hidden[lo : lo + step]
            t = safe_targets[lo : lo + step]
            row_weight = valid[lo : lo + step].float() / n_valid  # 1 / n_valid, or 0 for ignored rows
            logits = (h @ weight.t()).float()[:, :vocab_size]
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
                g = grad_logits.to(hidden.dtype)  # a no-op in fp32
                grad_hidden[lo : lo + step] = g @ vocab_weight
                if g.dtype == torch.float32:  # accumulate in place (written as out= so FLOP counters see it)
                    rows = grad_weight[:vocab_size]
                    torch.addmm(rows, g.t(), h, out=rows)
                else:
                    grad_weight[:vocab_size] += (g.t() @ h).float()
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, (grad_weight * grad_output).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int = -100
) -> torch.Tensor:
    """mean over non-ignored rows of cross_entropy(hidden @ weight[:vocab_size].T, targets).

    `hidden` is (N, d), `weight` is (padded_vocab, d); rows of the weight past `vocab_size` are padding
    and take no part. Equals `F.cross_entropy` on the full logits within floating-point tolerance.
    """
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, ignore_index, need_grad)
