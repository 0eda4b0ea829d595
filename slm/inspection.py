"""What the model sees and predicts, as plain data: token probabilities, next-token candidates,
entropy, attention maps, a logit lens, and the next-token distribution before and after sampling
filters.

Everything here is computed from one forward pass (`model.trace`) or a direct call of the model and
returned as dataclasses of Python numbers and numpy arrays, so that the playground, the plots and
the tests all read the same numbers and nothing here knows about a user interface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import attention_backend
from .config import SLIDING
from .model import Gemma3LM
from .sampling import next_token_probabilities
from .tokenizer import Tokenizer


@dataclass
class Candidate:
    """One possible next token and the probability the model gives it."""

    token_id: int
    text: str  # display string (`Tokenizer.token_strings`)
    probability: float


@dataclass
class NextTokenView:
    """The model's distribution for the token after `position`."""

    position: int
    candidates: list[Candidate]  # most likely first
    entropy: float  # in nats, of the full distribution

    @property
    def effective_choices(self) -> float:
        """exp(entropy): how many equally likely tokens would be this uncertain."""
        return math.exp(self.entropy)


@dataclass
class Inspection:
    """One text as the model sees it."""

    token_ids: list[int]
    tokens: list[str]  # display strings, one per token
    token_probabilities: list[float | None]  # p(token i | tokens < i); None for position 0
    next_tokens: list[NextTokenView]  # one per position: what the model expects next
    attentions: list[np.ndarray]  # per layer, fp32 (heads, T, T); row = query, column = key
    layer_types: list[str]  # "sliding_attention" / "full_attention", per layer
    sliding_window: int
    hidden_states: torch.Tensor = field(repr=False)  # (layers + 1, T, hidden) on CPU: the logit lens reads these
    dropped_tokens: int = 0  # tokens cut from the start to fit the length limit

    def __len__(self) -> int:
        return len(self.token_ids)

    def window_of(self, layer: int) -> int | None:
        """The attention window of a layer (None for a global layer)."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None


@dataclass
class LensRow:
    """The most likely next tokens read out of the residual stream at one depth."""

    depth: int  # 0 = the embeddings, i = after layer i
    label: str
    candidates: list[Candidate]


@dataclass
class SamplingCandidate:
    """A token's probability under the model, and after temperature / top-k / top-p."""

    token_id: int
    text: str
    probability: float  # softmax of the raw logits
    sampling_probability: float  # what the sampler actually draws from (0 when filtered out)


@dataclass
class SamplingView:
    """The next-token distribution before and after the sampling settings, for teaching."""

    candidates: list[SamplingCandidate]  # the most likely tokens under the model, most likely first
    temperature: float
    top_k: int | None
    top_p: float | None
    entropy: float  # nats, raw distribution
    sampling_entropy: float  # nats, after the settings
    tokens_kept: int  # how many tokens still have a non-zero chance


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last axis; tokens with zero probability contribute nothing."""
    probs = log_probs.exp()
    return -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(-1)


def _candidates(tokenizer: Tokenizer, probs: torch.Tensor, k: int) -> list[Candidate]:
    values, ids = torch.topk(probs, min(k, probs.shape[-1]))
    texts = tokenizer.token_strings(ids.tolist())
    return [Candidate(int(i), t, float(p)) for i, t, p in zip(ids.tolist(), texts, values.tolist(), strict=True)]


def fit_to_length(ids: Sequence[int], max_tokens: int) -> tuple[list[int], int]:
    """Keep the last `max_tokens` ids (the most recent context matters most); also return how many were dropped."""
    ids = list(ids)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    dropped = max(0, len(ids) - max_tokens)
    return ids[dropped:], dropped


LOGIT_CHUNK_ELEMENTS = 1 << 22  # logits held at once: 16 MB in fp32, whatever the vocabulary


def _next_token_statistics(
    model: Gemma3LM, final: torch.Tensor, ids: Sequence[int], top_k: int
) -> tuple[list[float], list[float], list[list[int]], list[list[float]]]:
    """From the final normed hidden states (T, D): p(token t+1 | ...), the entropy and the top-k of every
    position, without ever holding the (T, vocab) logits.

    The output head runs over one slice of the vocabulary at a time, for all positions at once: its
    weight (671 MB for Gemma 3 270M in fp32) is read once, where slicing the positions instead read it
    once per slice. The softmax statistics merge across slices as in online softmax, in fp32: with the
    running maximum m, s = sum exp(l - m) and u = sum exp(l - m) * (l - m), log Z = m + log s and the
    entropy is log s - u / s (both terms taken relative to m, so nothing large cancels). Top-k runs on
    the model's device and only k numbers per position leave it."""
    vocab, length = model.config.vocab_size, final.shape[0]
    width = min(vocab, max(1, LOGIT_CHUNK_ELEMENTS // length))
    device = final.device
    targets = torch.tensor([*ids[1:], 0], dtype=torch.long, device=device)[:, None]
    k = min(top_k, vocab)
    # a finite start, so that 0 * (old maximum - new maximum) stays 0 on the first slice
    running_max = torch.full((length, 1), -torch.finfo(torch.float32).max, device=device)
    sum_exp = torch.zeros(length, 1, device=device)
    sum_exp_shifted = torch.zeros(length, 1, device=device)
    target_logit = torch.zeros(length, 1, device=device)
    top_values = torch.full((length, k), -math.inf, device=device)
    top_ids = torch.zeros(length, k, dtype=torch.long, device=device)
    for lo in range(0, vocab, width):
        hi = min(lo + width, vocab)
        logits = model.logits_slice(final, lo, hi).float()
        new_max = torch.maximum(running_max, logits.amax(-1, keepdim=True))
        delta = running_max - new_max  # <= 0: moves the sums to the new maximum
        rescale = torch.exp(delta)
        shifted = logits - new_max
        weights = torch.exp(shifted)
        sum_exp_shifted.addcmul_(sum_exp, delta).mul_(rescale)
        sum_exp.mul_(rescale).add_(weights.sum(-1, keepdim=True))
        sum_exp_shifted.add_(weights.mul_(shifted).sum(-1, keepdim=True))  # (a pairwise sum: accurate in fp32)
        running_max = new_max
        inside = (targets >= lo) & (targets < hi)
        target_logit += torch.where(inside, logits.gather(-1, (targets - lo).clamp(0, hi - lo - 1)), 0.0)
        values, positions = torch.topk(logits, min(k, hi - lo), dim=-1)
        merged_values, order = torch.cat([top_values, values], -1).topk(k, dim=-1)
        top_ids = torch.cat([top_ids, positions + lo], -1).gather(-1, order)
        top_values = merged_values
    log_z = running_max + sum_exp.log()
    entropies = (sum_exp.log() - sum_exp_shifted / sum_exp)[:, 0]
    return (
        (target_logit - log_z)[:-1, 0].exp().tolist(),
        entropies.clamp_min(0.0).tolist(),
        top_ids.tolist(),
        (top_values - log_z).exp().tolist(),
    )


def inspect_ids(
    model: Gemma3LM, tokenizer: Tokenizer, ids: Sequence[int], top_k: int = 10, max_tokens: int | None = None
) -> Inspection:
    """Run the model once over `ids` and collect everything the Inspect view shows.

    Texts longer than `max_tokens` (default: the model's context length) keep their last tokens.
    """
    limit = min(max_tokens or model.config.context_length, model.config.context_length)
    ids, dropped = fit_to_length(ids, limit)
    if not ids:
        raise ValueError("there is no token to inspect: the text is empty")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        # the layers once, keeping every hidden state and attention map; the (T, vocab) logits are never
        # held whole: with Gemma's 262,144 tokens they would be 1 GB in fp32 for 1,000 tokens
        final, states, attentions = model._run_layers(
            input_ids, model._positions(input_ids, None), attention_backend("eager"), None, return_trace=True
        )
        seen, entropies, top_ids, top_probs = _next_token_statistics(model, final[0], ids, top_k)
    next_tokens = [
        NextTokenView(
            position=t,
            candidates=[
                Candidate(i, text, p)
                for i, text, p in zip(top_ids[t], tokenizer.token_strings(top_ids[t]), top_probs[t], strict=True)
            ],
            entropy=entropies[t],
        )
        for t in range(len(ids))
    ]
    return Inspection(
        token_ids=ids,
        tokens=tokenizer.token_strings(ids),
        token_probabilities=[None, *seen],
        next_tokens=next_tokens,
        attentions=[a[0].float().cpu().numpy() for a in attentions],
        layer_types=list(model.config.layer_types),
        sliding_window=model.config.sliding_window,
        hidden_states=torch.stack([h[0] for h in states]).cpu(),
        dropped_tokens=dropped,
    )


def inspect_text(
    model: Gemma3LM, tokenizer: Tokenizer, text: str, top_k: int = 10, max_tokens: int | None = None
) -> Inspection:
    """`inspect_ids` for a text (a literal `<|endoftext|>` becomes the end-of-text token)."""
    return inspect_ids(model, tokenizer, tokenizer.encode(text), top_k=top_k, max_tokens=max_tokens)


def depth_label(depth: int, layer_types: Sequence[str]) -> str:
    """'embeddings' for depth 0, else 'layer i (sliding|global)'."""
    if depth == 0:
        return "embeddings"
    kind = "sliding" if layer_types[depth - 1] == SLIDING else "global"
    return f"layer {depth} ({kind})"


def logit_lens(
    model: Gemma3LM, tokenizer: Tokenizer, inspection: Inspection, position: int, top_k: int = 3
) -> list[LensRow]:
    """The next-token prediction at `position` read out after every layer.

    Each residual-stream state goes through the model's own final norm and output head, the way the
    last layer's output does; the last row is therefore exactly the model's prediction.
    """
    if not 0 <= position < len(inspection):
        raise ValueError(f"position must be in [0, {len(inspection) - 1}], got {position}")
    states = inspection.hidden_states[:, position].to(device=model.device, dtype=model.dtype)  # (L+1, D)
    with torch.inference_mode():
        probs = torch.softmax(model.logits(model.norm(states)).float(), dim=-1)
    return [
        LensRow(d, depth_label(d, inspection.layer_types), _candidates(tokenizer, probs[d], top_k))
        for d in range(probs.shape[0])
    ]


def next_token_logits(model: Gemma3LM, ids: Sequence[int]) -> torch.Tensor:
    """fp32 logits (vocab,) for the token after `ids`, which are cut to the context length from the left."""
    ids, _ = fit_to_length(ids, model.config.context_length)
    if not ids:
        raise ValueError("need at least one token to predict the next one")
    with torch.inference_mode():
        logits = model(torch.tensor([ids], dtype=torch.long, device=model.device), last_only=True)
    return logits[0, -1].float()


def sampling_view(
    logits: torch.Tensor,
    tokenizer: Tokenizer,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    count: int = 10,
) -> SamplingView:
    """The `count` most likely next tokens with their probability before and after the sampling settings.

    Temperature, top-k and top-p never reorder tokens, so the model's top tokens are also the
    sampler's; the filtered ones show a sampling probability of 0.
    """
    logits = logits.float()
    raw_log_probs = torch.log_softmax(logits, dim=-1)
    processed = next_token_probabilities(logits, temperature, top_k, top_p)
    top = torch.topk(raw_log_probs, min(count, logits.shape[-1]))
    ids = top.indices.tolist()
    texts = tokenizer.token_strings(ids)
    candidates = [
        SamplingCandidate(i, t, math.exp(lp), float(processed[i]))
        for i, t, lp in zip(ids, texts, top.values.tolist(), strict=True)
    ]
    processed_log = torch.log(processed)
    return SamplingView(
        candidates=candidates,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        entropy=float(_entropy(raw_log_probs)),
        sampling_entropy=float(_entropy(processed_log)),
        tokens_kept=int((processed > 0).sum()),
    )


@dataclass
class TokenChoice:
    """One chosen next token: its probability under the model and under the sampler, and its rank."""

    token_id: int
    probability: float  # softmax of the raw logits
    sampling_probability: float  # after temperature / top-k / top-p (what a draw had)
    rank: int  # 1 = the model's most likely token


def token_choice(
    logits: torch.Tensor, token_id: int, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None,
) -> TokenChoice:
    """How likely `token_id` was at this step (for "drew ' girl': 20.1%, rank 2")."""
    logits = logits.float()
    processed = next_token_probabilities(logits, temperature, top_k, top_p)
    probability = torch.softmax(logits, dim=-1)[token_id]
    rank = int((logits > logits[token_id]).sum()) + 1
    return TokenChoice(int(token_id), float(probability), float(processed[token_id]), rank)
