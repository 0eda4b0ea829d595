"""Cross-entropy fused with the output projection, computed in row chunks.

For a 50k vocabulary the logits dwarf every other activation: batch 16 x 1024 tokens is 3.3 GB in
fp32, and autograd would keep them (and their gradient) alive. Here each chunk of rows is projected,
its loss and its gradients are computed at once, and the next chunk overwrites its logits: peak
memory is one chunk (a buffer reused between steps), and backward is two multiplications by a scalar.

Mixed precision: under autocast the hidden states and the vocabulary matrix are cast to the autocast
dtype once per call, inside the function (autocast is off there, where nothing would otherwise stop
a re-cast per chunk), and the GEMMs run in that dtype; the softmax is always fp32. The gradients are
accumulated in fp32 and returned in the inputs' own dtypes (fp32 for fp32 master weights, with no
round trip through bf16), multiplied by the incoming gradient in backward: that is where a
GradScaler's loss scale arrives, so an fp16 gradient is formed only after scaling (unscaled,
d(mean loss)/d(hidden) is ~1/N and underflows fp16). The padded vocabulary columns are masked to
-inf rather than sliced off, so every GEMM keeps the padded, aligned width.

`TrainingVocabulary` computes the same loss over the whole vocabulary at the cost of the ids a
training text uses (see its docstring): for TinyStories about 7k of GPT-2's 50,257.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 25  # ~32M logits (128 MB in fp32) per chunk

_workspaces = threading.local()


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _workspace(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) buffer kept between chunks and calls (one per thread).

    A fresh 128 MB tensor per chunk costs more than the arithmetic on it on a CPU: every page of
    it is faulted in again (about 65 ms of a 210 ms logits GEMM on one core, measured), so the
    logits live in one buffer that every step reuses. (CUDA's caching allocator does this anyway.)
    """
    if torch.compiler.is_compiling():  # a traced graph plans its own memory; a cached tensor would tie graphs
        return torch.empty((rows, cols), dtype=dtype, device=device)
    buffers: dict[str, torch.Tensor | None] = _workspaces.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if (buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.shape[1] != cols
            or buffer.shape[0] < rows):
        buffers[name] = None  # free the old one before the new one is allocated
        buffer = buffers[name] = torch.empty((rows, cols), dtype=dtype, device=device)
    return buffer[:rows]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, ignore_index, need_grad, dtype, bias):  # type: ignore[override]
        ctx.dtypes = (hidden.dtype, weight.dtype)
        # the GEMMs run in `dtype`; the softmax and the gradients are fp32, returned in the inputs' dtypes
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        n_rows = hidden.shape[0]
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        step = _chunk_rows(weight.shape[0])
        width, low_precision = weight.shape[0], dtype != torch.float32
        chunk = min(step, n_rows)
        logits_fp32 = _workspace("logits", chunk, width, torch.float32, hidden.device)
        if low_precision:  # the GEMMs read and write these; the softmax is done in fp32 in the other
            logits_low = _workspace("low", chunk, width, dtype, hidden.device)
            if need_grad:
                grad_weight_low = _workspace("grad_weight", width, weight.shape[1], dtype, hidden.device)
        for lo in range(0, n_rows, step):
            h = hidden[lo : lo + step]
            t = safe_targets[lo : lo + step]
            rows = h.shape[0]
            row_weight = valid[lo : lo + step].float() / n_valid  # 1 / n_valid, or 0 for ignored rows
            logits = logits_fp32[:rows]
            if low_precision:
                torch.mm(h, weight.t(), out=logits_low[:rows])
                logits.copy_(logits_low[:rows])
            else:
                torch.mm(h, weight.t(), out=logits)
            if bias is not None:
                logits.add_(bias)
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
                grad_logits[torch.arange(rows, device=t.device), t] -= row_weight
                if not low_precision:
                    torch.mm(grad_logits, weight, out=grad_hidden[lo : lo + step])
                    torch.addmm(grad_weight, grad_logits.t(), h, out=grad_weight)  # out=: FLOP counters see it
                else:
                    # fp16/bf16 GEMMs: grad_logits times n_valid lies in [-1, 1], where fp16 keeps its
                    # precision (divided by n_valid it would underflow); the factor comes off in fp32
                    g = logits_low[:rows].copy_(grad_logits.mul_(n_valid))
                    torch.div((g @ weight).float(), n_valid, out=grad_hidden[lo : lo + step])
                    grad_weight.add_(torch.mm(g.t(), h, out=grad_weight_low))
        if need_grad:
            if low_precision:
                grad_weight.div_(n_valid)
            ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_output).to(hidden_dtype), (grad_weight * grad_output).to(weight_dtype),
                None, None, None, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int = -100,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean over non-ignored rows of cross_entropy(hidden @ weight[:vocab_size].T + bias, targets).

    `hidden` is (N, d), `weight` is (padded_vocab, d); rows of the weight past `vocab_size` are padding
    and take no part. `bias` (padded_vocab,), fp32, is added to the logits (no gradient).
    Equals `F.cross_entropy` on the full logits within floating-point tolerance.
    Under autocast the GEMMs run in the autocast dtype (both inputs cast once per call).
    """
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden, weight, targets, vocab_size, ignore_index, need_grad, dtype, bias
        )


# ----- the vocabulary of a training text -----------------------------------------------------------
COLUMN_ALIGNMENT = 64  # the shortcut's GEMM width is padded to a multiple of this (masked columns)


class _GatherColumns(torch.autograd.Function):
    """weight[columns], whose backward gives every unused row an equal share of the shared column's gradient.

    The columns are the `width - 1` used ids' rows, the shared row, then masked filler. `sources` names,
    for each row of the weight, the row of the gradient it takes: its own column's (a used id), the
    shared column's divided by `count` (an unused id) or zero (padding), so the full-size gradient is
    written in one pass. An `owner` (eager runs) lends the buffer to write it into.
    """

    @staticmethod
    def forward(ctx, weight, columns, sources, width, count, owner):  # type: ignore[override]
        ctx.save_for_backward(sources)
        ctx.weight_shape, ctx.width, ctx.count, ctx.owner = weight.shape, width, count, owner
        return weight.index_select(0, columns)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (sources,) = ctx.saved_tensors
        rows = torch.cat([grad[: ctx.width], grad.new_zeros(1, grad.shape[1])])  # then the zero row
        rows[ctx.width - 1] /= ctx.count  # each unused row's softmax share is 1/count of the shared column's
        full = ctx.owner.gradient_buffer(ctx.weight_shape, grad) if ctx.owner is not None else None
        if full is None:
            full = grad.new_empty(ctx.weight_shape)
        return torch.index_select(rows, 0, sources, out=full), None, None, None, None, None


class TrainingVocabulary:
    """The token ids a training text uses: a loss exact over the whole vocabulary at the cost of those ids.

    The output rows of ids the text never uses (as targets or inputs) take part only in the softmax's
    denominator. If those rows are all equal, each has the logit h.u, so together they are one column
    with logit h.u + log(count), and each row's gradient is that column's divided by the count:
    equal gradients keep equal rows equal under an element-wise optimizer (AdamW, with weight decay).
    A fresh model starts them equal (`share_unused_rows`; zero, where a random row would be noise the
    text never corrects); a resumed run is checked (`rows_are_shared`) and an imported model, whose
    rows differ, trains over the full vocabulary. TinyStories uses ~7k of GPT-2's 50,257 ids: the
    output GEMMs, most of a small model's FLOPs, shrink about seven-fold; the model and what it can
    generate stay a plain full-vocabulary model.
    """

    def __init__(self, used: torch.Tensor, vocab_size: int) -> None:
        used = torch.unique(used.to(torch.int64))
        if used.numel() == 0 or int(used[0]) < 0 or int(used[-1]) >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}) and not be empty")
        mask = torch.ones(vocab_size, dtype=torch.bool)
        mask[used] = False
        self.used, self.unused = used, mask.nonzero().squeeze(1)
        if self.unused.numel() == 0:
            raise ValueError("the text uses every id of the vocabulary: nothing to share")
        self.vocab_size = vocab_size
        self.width = used.numel() + 1  # the used ids' columns, then the shared one
        padded = -(-self.width // COLUMN_ALIGNMENT) * COLUMN_ALIGNMENT
        filler = self.unused[:1].expand(padded - self.width)  # masked to -inf: no probability, no gradient
        self.columns = torch.cat([used, self.unused[:1], filler])
        self.bias = torch.zeros(padded, dtype=torch.float32)
        self.bias[used.numel()] = math.log(self.unused.numel())
        self.column_of = torch.full((vocab_size,), -1, dtype=torch.int64)  # of a target: used ids only
        self.column_of[used] = torch.arange(used.numel())
        self.input_column_of = self.column_of.masked_fill(self.column_of < 0, self.width - 1)  # unused: shared
        self._sources: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._spare_gradient: torch.Tensor | None = None

    @classmethod
    def of_tokens(cls, tokens: np.ndarray, vocab_size: int) -> TrainingVocabulary | None:
        """The vocabulary of a token stream, or None when it uses every id, or none (no shortcut to take)."""
        seen = np.zeros(vocab_size, dtype=bool)
        for lo in range(0, len(tokens), 1 << 24):  # in slices: a memory-mapped epoch of TinyStories is ~1 GB
            chunk = np.asarray(tokens[lo : lo + (1 << 24)])
            if chunk.size and int(chunk.max()) >= vocab_size:
                raise ValueError(f"the tokens hold id {int(chunk.max())}; the vocabulary has {vocab_size}")
            seen[chunk] = True
        used = torch.from_numpy(np.flatnonzero(seen))
        return cls(used, vocab_size) if 0 < used.numel() < vocab_size else None

    def to(self, device: torch.device | str) -> TrainingVocabulary:
        for name in ("used", "unused", "columns", "bias", "column_of", "input_column_of"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def share_unused_rows(self, weight: torch.Tensor) -> None:
        """Set the rows of unused ids to zero (a fresh model's weights, before training)."""
        weight[self.unused.to(weight.device)] = 0

    @torch.no_grad()
    def rows_are_shared(self, weight: torch.Tensor) -> bool:
        rows = weight[self.unused.to(weight.device)]
        return bool((rows == rows[:1]).all())

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight's rows as the loss's columns (used ids, the shared row, filler); the gradient that
        reaches them comes back to every row of `weight`, each unused row with its share."""
        key = (weight.shape[0], weight.device)
        if key not in self._sources:  # the row of the columns' gradient each weight row takes (see _GatherColumns)
            sources = torch.full((weight.shape[0],), self.width, dtype=torch.int64)  # padding: the zero row
            sources[: self.vocab_size] = self.width - 1
            sources[self.used.cpu()] = torch.arange(self.width - 1)
            self._sources[key] = sources.to(weight.device)
        owner = None if torch.compiler.is_compiling() else self
        return _GatherColumns.apply(weight, self.columns, self._sources[key], self.width, self.unused.numel(), owner)

    def input_columns(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The column of each input id in `gather`'s result (an unused id: the shared row, which its row equals)."""
        return self.input_column_of[input_ids]

    def keep_gradient(self, weight: torch.Tensor) -> None:
        """Keep `weight`'s gradient, about to be dropped, as the buffer the next backward writes into: on a
        CPU a fresh vocabulary-sized tensor costs more in page faults (~18 ms for GPT-2's at width 192)
        than writing it. Autograd takes the buffer over as the new gradient where nothing else holds it."""
        self._spare_gradient = weight.grad

    def gradient_buffer(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor | None:
        spare, self._spare_gradient = self._spare_gradient, None
        if spare is None or spare.shape != shape or spare.dtype != like.dtype or spare.device != like.device:
            return None
        return spare

    def loss(self, hidden: torch.Tensor, columns: torch.Tensor, targets: torch.Tensor,
             ignore_index: int = -100) -> torch.Tensor:
        """`linear_cross_entropy(hidden, weight, targets, vocab_size)` over `columns = gather(weight)`;
        targets must be used ids (or ignored)."""
        ignored = targets == ignore_index
        targets = torch.where(ignored, targets, self.column_of[targets.masked_fill(ignored, 0)])
        return linear_cross_entropy(hidden, columns, targets, self.width, ignore_index, bias=self.bias)
