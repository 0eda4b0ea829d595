"""Watching a model learn: one text scored by every snapshot of a run, and two checkpoints compared
token by token, as plain data.

A text is scored the way training sees a story start: after an end-of-text token. So every token of
the text gets a probability (the first one too), the loss is the mean over all of them, and bits per
byte divide the summed loss (in bits) by the UTF-8 bytes those tokens stand for, which makes runs
with different tokenizers comparable.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .engine import generate
from .inspection import Candidate
from .loading import load_model
from .model import Gemma3LM
from .snapshots import list_snapshots
from .tokenizer import Tokenizer

TOP_K = 5  # next-token candidates kept per position
NEW_TOKENS = 30  # length of the continuations of the prompt
SAMPLE_SEED = 0  # the fixed seed of the sampled continuation: the same draw at every snapshot
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 50


@dataclass
class ScoredText:
    """One text under one model: each token's log-probability and the candidates after each token."""

    token_ids: list[int]
    tokens: list[str]  # display strings
    log_probs: list[float]  # ln p(token i | end-of-text, tokens < i), nats
    candidates: list[list[Candidate]]  # candidates[i]: what the model expects after token i
    entropies: list[float]  # entropies[i]: of the distribution after token i, nats
    num_bytes: int  # UTF-8 bytes the scored tokens stand for
    dropped_tokens: int = 0  # tokens cut from the end to fit the context

    @property
    def probabilities(self) -> list[float]:
        return [math.exp(lp) for lp in self.log_probs]

    @property
    def loss(self) -> float:
        """Mean cross-entropy over the text's tokens, in nats."""
        return -sum(self.log_probs) / len(self.log_probs)

    @property
    def bits_per_byte(self) -> float:
        return -sum(self.log_probs) / math.log(2) / max(self.num_bytes, 1)


def text_ids(tokenizer: Tokenizer, text: str, context_length: int) -> tuple[list[int], int]:
    """The text's token ids cut to fit after one end-of-text token, and how many were cut from the end."""
    if not (text or "").strip():
        raise ValueError("there is no text to score: enter some text")
    ids = tokenizer.encode(text)
    keep = max(context_length - 1, 1)
    return ids[:keep], max(0, len(ids) - keep)


def score_ids(model: Gemma3LM, tokenizer: Tokenizer, ids: Sequence[int], top_k: int = TOP_K) -> ScoredText:
    """Score token ids (already cut to fit) with one forward pass after an end-of-text token."""
    ids = list(ids)
    if not ids:
        raise ValueError("there is no token to score")
    inputs = torch.tensor([[tokenizer.eot_id, *ids]], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(inputs)[0].float(), dim=-1)  # (T + 1, V)
    targets = torch.tensor(ids, dtype=torch.long, device=log_probs.device)
    seen = log_probs[:-1].gather(-1, targets[:, None]).squeeze(-1).tolist()
    top = torch.topk(log_probs[1:], min(top_k, log_probs.shape[-1]), dim=-1)
    top_ids, top_probs = top.indices.tolist(), top.values.exp().tolist()
    candidates = [
        [Candidate(i, t, p) for i, t, p in zip(row_ids, tokenizer.token_strings(row_ids), row_probs, strict=True)]
        for row_ids, row_probs in zip(top_ids, top_probs, strict=True)
    ]
    probs = log_probs[1:].exp()
    entropies = (-(probs * log_probs[1:].masked_fill(probs == 0, 0.0)).sum(-1)).tolist()
    num_bytes = sum(len(tokenizer.token_bytes(i)) for i in ids)
    return ScoredText(ids, tokenizer.token_strings(ids), seen, candidates, entropies, num_bytes)


def score_text(model: Gemma3LM, tokenizer: Tokenizer, text: str, top_k: int = TOP_K) -> ScoredText:
    """`score_ids` for a text; a text longer than the context keeps its beginning."""
    ids, dropped = text_ids(tokenizer, text, model.config.context_length)
    scored = score_ids(model, tokenizer, ids, top_k)
    scored.dropped_tokens = dropped
    return scored


def continuations(model: Gemma3LM, tokenizer: Tokenizer, prompt: str, new_tokens: int = NEW_TOKENS) -> tuple[str, str]:
    """A greedy and a fixed-seed sampled continuation of `prompt` (the new text only)."""
    ids = tokenizer.encode(prompt)[-(model.config.context_length - new_tokens):] or [tokenizer.eot_id]
    out = []
    for temperature, top_k in ((0.0, None), (SAMPLE_TEMPERATURE, SAMPLE_TOP_K)):
        new = generate(model, ids, new_tokens, temperature=temperature, top_k=top_k, seed=SAMPLE_SEED,
                       stop_token_ids=[tokenizer.eot_id], compiled=False)
        out.append(tokenizer.decode([t for t in new if t != tokenizer.eot_id]))
    return out[0], out[1]


@dataclass
class SnapshotScore:
    """The text (and the prompt's continuations) at one snapshot."""

    step: int
    tokens_seen: int
    checkpoint: Path
    scored: ScoredText
    greedy: str | None = None
    sampled: str | None = None


@dataclass
class LearningTimeline:
    """One text through every snapshot of a run, in step order."""

    run: str
    text: str
    prompt: str | None
    snapshots: list[SnapshotScore] = field(default_factory=list)

    @property
    def tokens(self) -> list[str]:
        return self.snapshots[0].scored.tokens if self.snapshots else []

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.snapshots]

    @property
    def losses(self) -> list[float]:
        return [s.scored.loss for s in self.snapshots]

    def as_dict(self) -> dict[str, Any]:
        """What the `watch_learning` API returns."""
        first = self.snapshots[0].scored if self.snapshots else None
        return {
            "run": self.run,
            "text": self.text,
            "tokens": self.tokens,
            "token_ids": first.token_ids if first else [],
            "bytes": first.num_bytes if first else 0,
            "dropped_tokens": first.dropped_tokens if first else 0,
            "prompt": self.prompt,
            "snapshots": [
                {
                    "step": s.step,
                    "tokens_seen": s.tokens_seen,
                    "loss": s.scored.loss,
                    "bits_per_byte": s.scored.bits_per_byte,
                    "probabilities": s.scored.probabilities,
                    **({"greedy": s.greedy, "sampled": s.sampled} if s.greedy is not None else {}),
                }
                for s in self.snapshots
            ],
        }


def watch_run(
    run_dir: str | Path,
    tokenizer: Tokenizer,
    text: str,
    prompt: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LearningTimeline:
    """Score `text` with every snapshot of a run (and continue `prompt`, when given), oldest first."""
    run_dir = Path(run_dir)
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise ValueError(f"{run_dir.name} has no snapshots: runs keep them as they train (snapshots/step-*)")
    timeline = LearningTimeline(run_dir.name, text, prompt or None)
    ids = dropped = None
    for i, snap in enumerate(snapshots):
        if on_progress is not None:
            on_progress(i, len(snapshots))
        model = load_model(snap.path, device=device, dtype=dtype)
        if ids is None:
            ids, dropped = text_ids(tokenizer, text, model.config.context_length)
        scored = score_ids(model, tokenizer, ids)
        scored.dropped_tokens = dropped
        greedy = sampled = None
        if prompt:
            greedy, sampled = continuations(model, tokenizer, prompt)
        timeline.snapshots.append(SnapshotScore(snap.step, snap.tokens_seen, snap.path, scored, greedy, sampled))
        del model
    return timeline


class TimelineCache:
    """The last few timelines, keyed by (run folder, its snapshots, text, prompt): a slider move or a
    repeated request is answered without touching a model. A new snapshot makes a new key."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[tuple, LearningTimeline] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(run_dir: Path, text: str, prompt: str | None) -> tuple:
        snaps = tuple((s.step, (s.path / "model.safetensors").stat().st_mtime_ns) for s in list_snapshots(run_dir))
        return (str(Path(run_dir).resolve()), snaps, text, prompt or None)

    def get(self, key: tuple) -> LearningTimeline | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: tuple, timeline: LearningTimeline) -> None:
        with self._lock:
            self._items[key] = timeline
            while len(self._items) > self.size:
                self._items.popitem(last=False)


# ----- two checkpoints, token by token --------------------------------------------------------------
@dataclass
class TokenChange:
    position: int
    token: str
    probability_a: float
    probability_b: float
    delta: float  # ln p_b - ln p_a: positive where b predicts the token better


@dataclass
class Comparison:
    """One text under two models: per token, the change in log-probability from `a` to `b`."""

    a: str
    b: str
    tokens: list[str]
    token_ids: list[int]
    log_probs_a: list[float]
    log_probs_b: list[float]
    loss_a: float
    loss_b: float

    @property
    def deltas(self) -> list[float]:
        return [lb - la for la, lb in zip(self.log_probs_a, self.log_probs_b, strict=True)]

    def changes(self) -> list[TokenChange]:
        return [
            TokenChange(i, t, math.exp(la), math.exp(lb), lb - la)
            for i, (t, la, lb) in enumerate(zip(self.tokens, self.log_probs_a, self.log_probs_b, strict=True))
        ]

    def most_changed(self, count: int = 10) -> list[TokenChange]:
        """The tokens whose log-probability moved most, either way, largest first."""
        return sorted(self.changes(), key=lambda c: abs(c.delta), reverse=True)[:count]

    def as_dict(self, count: int = 10) -> dict[str, Any]:
        """What the `compare_checkpoints` API returns."""
        deltas = self.deltas
        return {
            "a": self.a,
            "b": self.b,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "probabilities_a": [math.exp(v) for v in self.log_probs_a],
            "probabilities_b": [math.exp(v) for v in self.log_probs_b],
            "log_prob_change": deltas,
            "loss_a": self.loss_a,
            "loss_b": self.loss_b,
            "improved": sum(d > 0 for d in deltas),
            "worsened": sum(d < 0 for d in deltas),
            "most_changed": [vars(c) for c in self.most_changed(count)],
        }


def compare_models(
    model_a: Gemma3LM, model_b: Gemma3LM, tokenizer: Tokenizer, text: str, a: str = "a", b: str = "b"
) -> Comparison:
    """Score `text` with both models (cut to the shorter context) and pair the tokens up."""
    if model_a.config.vocab_size != model_b.config.vocab_size:
        raise ValueError(f"{a} and {b} have different vocabularies ({model_a.config.vocab_size:,} and "
                         f"{model_b.config.vocab_size:,} tokens): their probabilities cannot be compared")
    context = min(model_a.config.context_length, model_b.config.context_length)
    ids, _ = text_ids(tokenizer, text, context)
    first, second = score_ids(model_a, tokenizer, ids, top_k=1), score_ids(model_b, tokenizer, ids, top_k=1)
    return Comparison(a, b, first.tokens, ids, first.log_probs, second.log_probs, first.loss, second.loss)
