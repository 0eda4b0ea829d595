"""Token embeddings that start from the training text's co-occurrence statistics.

A fresh model's embedding is noise: its first few hundred steps are spent finding out which tokens
behave alike (" Lily" and " Sue", " ran" and " walked"). Classic word vectors get that from counting
alone: the positive pointwise mutual information (PPMI) of tokens that occur within a couple of
positions of each other, factored by a truncated SVD, places tokens that share neighbours close
together (Levy & Goldberg, 2014). Starting the (tied) embedding there is worth ~0.05 nats held out
after 400k tokens of `tiny`, ~0.1 after 100k and less later (bench/QUALITY.md), for about two seconds
of counting before the first step. It changes where training starts, nothing else: the model is the
same plain Gemma 3 and keeps no trace of how it was initialised.
"""

from __future__ import annotations

import numpy as np
import torch

WINDOW = 2  # neighbours counted on each side, the nearer weighted 1/distance (1 and 5 did worse)
MAX_TOKENS = 4_000_000  # a prefix of a long training stream is enough to place its common ids
CONTEXT_SMOOTHING = 0.75  # context counts raised to this power: rare contexts weigh less in the PMI
SVD_ITERATIONS = 4  # power iterations of the randomised SVD
SCALE = 2.0  # the vectors' standard deviation in units of the model's init std (at 400k tokens: 1 lost 0.014, 4 tied)


def cooccurrence_vectors(tokens: np.ndarray, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, vectors): the ids the first MAX_TOKENS tokens use and a (len(ids), width) matrix of their
    PPMI-SVD vectors, centred, with unit standard deviation. Reproducible for a given `seed`."""
    stream = torch.from_numpy(np.asarray(tokens[:MAX_TOKENS]).astype(np.int64))
    ids, index = torch.unique(stream, return_inverse=True)
    n = ids.numel()
    rows, cols, weights = [], [], []
    for distance in range(1, min(WINDOW, index.numel() - 1) + 1):
        left, right = index[:-distance], index[distance:]
        weight = torch.full((left.numel(),), 1.0 / distance)
        rows += [left, right]
        cols += [right, left]
        weights += [weight, weight]
    if not rows:
        return ids, torch.zeros(n, width)
    counts = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(weights),
                                     (n, n), check_invariants=False).coalesce()
    row, col = counts.indices()
    count = counts.values()
    total = count.sum()
    row_total = torch.zeros(n).index_add_(0, row, count)
    context = torch.zeros(n).index_add_(0, col, count) ** CONTEXT_SMOOTHING
    context = context / context.sum() * total
    pmi = torch.log(count * total / (row_total[row] * context[col]))
    positive = pmi > 0
    ppmi = torch.sparse_coo_tensor(torch.stack([row[positive], col[positive]]), pmi[positive], (n, n),
                                   check_invariants=False).coalesce()
    rank = min(width, n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(ppmi, q=rank, niter=SVD_ITERATIONS)
    vectors = torch.zeros(n, width)
    vectors[:, :rank] = u * s.sqrt()
    vectors -= vectors.mean(0, keepdim=True)
    return ids, vectors / vectors.std().clamp(min=1e-12)


@torch.no_grad()
def init_embedding_from_text(embedding: torch.Tensor, tokens: np.ndarray, std: float, seed: int = 0) -> int:
    """Overwrite the rows of the ids `tokens` uses with their co-occurrence vectors at standard deviation
    SCALE x `std` (the other rows keep their values); returns how many rows were set."""
    ids, vectors = cooccurrence_vectors(tokens, embedding.shape[1], seed)
    if int(ids.max()) >= embedding.shape[0]:
        raise ValueError(f"the tokens hold id {int(ids.max())}; the embedding has {embedding.shape[0]} rows")
    embedding[ids.to(embedding.device)] = (vectors * SCALE * std).to(embedding)
    return ids.numel()
