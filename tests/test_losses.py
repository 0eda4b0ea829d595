"""The fused linear cross-entropy in fp32, under bf16 autocast, and in fp16 with a loss scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from slm.losses import TrainingVocabulary, linear_cross_entropy

VOCAB, PADDED, DIM = 300, 320, 32


def data(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, DIM, generator=g)
    weight = torch.randn(PADDED, DIM, generator=g) * 0.5
    weight[VOCAB:] = 0.0
    targets = torch.randint(0, VOCAB, (rows,), generator=g)
    targets[::7] = -100
    return hidden, weight, targets


def reference(hidden, weight, targets):
    """The unfused loss on fp32 logits, padding rows sliced off."""
    hidden = hidden.detach().float().requires_grad_()
    weight = weight.detach().float().requires_grad_()
    loss = F.cross_entropy(hidden @ weight[:VOCAB].t(), targets, ignore_index=-100)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def test_fp32_equals_the_unfused_loss_and_padding_gets_no_gradient():
    hidden, weight, targets = data(50)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, VOCAB)
    loss.backward()
    ref_loss, ref_h, ref_w = reference(hidden, weight, targets)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert torch.allclose(h.grad, ref_h, atol=1e-6) and torch.allclose(w.grad[:VOCAB], ref_w[:VOCAB], atol=1e-6)
    assert w.grad[VOCAB:].abs().max() == 0


def test_fp16_gradients_survive_when_the_loss_is_scaled():
    """4096 rows: unscaled, d(mean loss)/d(hidden) is ~1e-5..1e-9 and fp16 flushes much of it to zero.
    With a GradScaler-like scale in grad_output, the fused loss's fp16 gradient matches fp32."""
    hidden, weight, targets = data(4096, seed=1)
    h = hidden.half().requires_grad_()
    w = weight.half().requires_grad_()
    scale = 2.0**16
    loss = linear_cross_entropy(h, w, targets, VOCAB)
    (loss * scale).backward()
    ref_loss, ref_h, ref_w = reference(h, w, targets)
    assert abs(loss.item() - ref_loss.item()) < 1e-3
    grad_h = h.grad.float() / scale
    grad_w = w.grad.float() / scale
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    assert (grad_h - ref_h).norm() / ref_h.norm() < 2e-3
    assert (grad_w[:VOCAB] - ref_w[:VOCAB]).norm() / ref_w.norm() < 2e-3
    # what the same gradient looks like when formed in fp16 before the scale: mostly gone
    # why it matters: the per-logit gradient (softmax - onehot) / n_valid, formed in fp16 before any
    # scale (as this loss once did), loses a large share of its entries to underflow
    valid = targets != -100
    logits = h[valid].detach().float() @ w[:VOCAB].detach().float().t()
    per_logit = torch.softmax(logits, -1) / valid.sum()
    assert (per_logit.half() == 0).float().mean() > 0.05


class CastCounter(TorchDispatchMode):
    """Counts fp32 -> lower-precision casts of tensors shaped like the vocabulary matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == (PADDED, DIM):
            self.casts += args[0].dtype == torch.float32 and out.dtype != torch.float32
        return out


def test_bf16_autocast_casts_the_vocabulary_once_and_matches_fp32(monkeypatch):
    import slm.losses

    monkeypatch.setattr(slm.losses, "CHUNK_ELEMENTS", PADDED * 64)  # 64 rows per chunk: several chunks
    hidden, weight, targets = data(300, seed=2)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    counter = CastCounter()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, VOCAB)
    assert counter.casts == 1
    loss.backward()
    ref_loss, ref_h, ref_w = reference(hidden, weight, targets)
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert (h.grad - ref_h).norm() / ref_h.norm() < 2e-2
    assert (w.grad[:VOCAB] - ref_w[:VOCAB]).norm() / ref_w.norm() < 2e-2


def test_the_reused_logits_buffer_leaves_no_trace_between_calls(monkeypatch):
    """The logits live in a buffer kept between calls (a fresh 128 MB one per chunk was slower than the
    arithmetic on it): calls of other sizes and precisions in between change nothing."""
    import slm.losses

    monkeypatch.setattr(slm.losses, "CHUNK_ELEMENTS", PADDED * 64)

    def run(rows: int, seed: int, autocast: bool):
        hidden, weight, targets = data(rows, seed=seed)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(h, w, targets, VOCAB)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    first = run(50, 3, autocast=False)
    run(300, 4, autocast=True)  # a larger buffer, a bf16 one, other values
    run(20, 5, autocast=False)
    again = run(50, 3, autocast=False)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    ref_loss, ref_h, ref_w = reference(*data(50, seed=3))
    assert torch.allclose(first[2][:VOCAB], ref_w[:VOCAB], atol=1e-6)
    assert abs(first[0].item() - ref_loss.item()) < 1e-5 and torch.allclose(first[1], ref_h, atol=1e-6)


# ----- the training text's vocabulary --------------------------------------------------------------
def shared_vocabulary_data(rows: int):
    """A text that uses ids 0..79 only, and weights whose other rows are all one (non-zero) vector."""
    hidden, weight, targets = data(rows)
    text = torch.randint(0, 80, (1000,), generator=torch.Generator().manual_seed(1)).numpy()
    vocabulary = TrainingVocabulary.of_tokens(text, VOCAB)
    vocabulary.share_unused_rows(weight)
    weight[vocabulary.unused] += torch.randn(DIM, generator=torch.Generator().manual_seed(2))
    targets = torch.where(targets == -100, targets, targets % 80)
    return hidden, weight, targets, vocabulary


def test_the_vocabulary_shortcut_gives_the_full_vocabulary_loss_and_gradients():
    hidden, weight, targets, vocabulary = shared_vocabulary_data(50)
    assert vocabulary.rows_are_shared(weight) and vocabulary.width == 81
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = vocabulary.loss(h, vocabulary.gather(w), targets)
    loss.backward()
    ref_loss, ref_h, ref_w = reference(hidden, weight, targets)
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    assert torch.allclose(h.grad, ref_h, atol=1e-6)
    assert torch.allclose(w.grad[:VOCAB], ref_w[:VOCAB], atol=1e-6)  # unused rows included, each its own share
    assert w.grad[VOCAB:].abs().max() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = vocabulary.loss(hidden, vocabulary.gather(weight), targets)
    assert abs(bf16.item() - ref_loss.item()) < 2e-2


def test_the_vocabulary_shortcut_trains_the_same_model_and_unused_rows_stay_shared():
    """AdamW with weight decay, ten steps: the shortcut and the full softmax reach the same weights."""
    hidden, weight, targets, vocabulary = shared_vocabulary_data(64)
    runs = []
    for shortcut in (True, False):
        w = weight.clone().requires_grad_()
        optimizer = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1)
        losses = []
        for step in range(10):
            h = hidden.roll(step, 0)
            if shortcut:
                loss = vocabulary.loss(h, vocabulary.gather(w), targets)
            else:
                loss = linear_cross_entropy(h, w, targets, VOCAB)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, w.detach()))
    (short_losses, short_w), (full_losses, full_w) = runs
    assert max(abs(a - b) for a, b in zip(short_losses, full_losses, strict=True)) < 1e-5
    assert torch.allclose(short_w, full_w, atol=1e-5)
    assert vocabulary.rows_are_shared(short_w) and not torch.equal(short_w[vocabulary.unused[0]], weight[100])


@pytest.mark.parametrize("tied", [True, False])
def test_a_models_loss_over_its_texts_ids_equals_the_full_loss_step_after_step(tied):
    """Through the whole model (tied: the inputs are looked up in the same columns as the head), three
    steps, each backward writing into the gradient the last step kept: the loss, every gradient (the
    unused rows each with their share) and the weights equal the full-vocabulary model's. (SGD: AdamW
    would turn the float noise of near-zero gradients into whole steps.)"""
    from slm.model import build_model
    from tests.conftest import small_config

    text = torch.randint(0, 80, (2000,), generator=torch.Generator().manual_seed(3))
    vocabulary = TrainingVocabulary.of_tokens(text.numpy(), VOCAB)
    models = [build_model(small_config(tie_embeddings=tied), seed=0) for _ in range(2)]
    for model in models:
        vocabulary.share_unused_rows(model.head_weight.detach())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1) for m in models]
    kept = None
    for step in range(3):
        windows = text[step * 200 : step * 200 + 4 * 33].view(4, 33)
        losses = [models[0].loss(windows[:, :-1], windows[:, 1:], vocabulary=vocabulary),
                  models[1].loss(windows[:, :-1], windows[:, 1:])]
        for loss in losses:
            loss.backward()
        assert abs(losses[0].item() - losses[1].item()) < 1e-5
        for (name, short), full in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
            assert torch.allclose(short.grad, full.grad, atol=5e-5), (step, name)
        if kept is not None:  # the buffer the last step kept became this step's gradient (no fresh allocation)
            assert models[0].head_weight.grad.data_ptr() == kept
        for optimizer in optimizers:
            optimizer.step()
        kept = models[0].head_weight.grad.data_ptr()
        vocabulary.keep_gradient(models[0].head_weight)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
    for short, full in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(short, full, atol=1e-5)
    assert vocabulary.rows_are_shared(models[0].head_weight)


def test_a_text_that_uses_every_id_takes_no_shortcut_and_foreign_ids_are_refused():
    assert TrainingVocabulary.of_tokens(np.arange(VOCAB), VOCAB) is None
    with pytest.raises(ValueError, match="id 305; the vocabulary has 300"):
        TrainingVocabulary.of_tokens(np.array([1, 2, VOCAB + 5]), VOCAB)
