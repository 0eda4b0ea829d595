"""Where a fresh model's token embedding starts: the training text's co-occurrence vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from training_helpers import ANIMALS, NAMES, PLACES, make_stories, quick_config, stories_file

from slm.embedding_init import cooccurrence_vectors
from slm.loading import load_model
from slm.model import build_model
from slm.tokenizer import load_tokenizer
from slm.training import LATEST_DIR, read_metrics, train
from train import start_line


def story_tokens(count: int) -> np.ndarray:
    tokenizer = load_tokenizer()
    ids: list[int] = []
    for story in tokenizer.encode_batch(make_stories(count)):
        ids += [*story, tokenizer.eot_id]
    return np.array(ids, dtype=np.int64)


def word_ids(words: list[str]) -> list[int]:
    tokenizer = load_tokenizer()
    ids = [tokenizer.encode(" " + w) for w in words]
    assert all(len(i) == 1 for i in ids), "each word should be one GPT-2 token"
    return [i[0] for i in ids]


def nearest_of_kind(rows: torch.Tensor, ids: torch.Tensor) -> float:
    """The share of names, animals and places whose nearest row (by cosine; `rows[i]` is id `ids[i]`'s) is
    a word of their own kind."""
    unit = torch.nn.functional.normalize(rows, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2)
    position = {int(i): p for p, i in enumerate(ids)}
    hits = total = 0
    for kind in (NAMES, ANIMALS, PLACES):
        kind_ids = word_ids(kind)
        for token in kind_ids:
            hits += int(ids[similarity[position[token]].argmax()]) in kind_ids
            total += 1
    return hits / total


def test_words_used_alike_get_neighbouring_vectors() -> None:
    """Names, animals and places each fill their own slots in the stories: every such word's nearest
    vector is another word of its kind, which random vectors would not give."""
    ids, vectors = cooccurrence_vectors(story_tokens(400), width=32)
    assert abs(float(vectors.mean())) < 1e-5 and abs(float(vectors.std()) - 1) < 1e-4
    assert nearest_of_kind(vectors, ids) == 1.0


def test_the_vectors_are_reproducible_and_leave_the_random_state_alone() -> None:
    tokens = story_tokens(50)
    torch.manual_seed(5)
    first = cooccurrence_vectors(tokens, width=16, seed=3)[1]
    after = torch.rand(3)
    torch.manual_seed(5)
    again = cooccurrence_vectors(tokens, width=16, seed=3)[1]
    assert torch.equal(first, again) and torch.equal(torch.rand(3), after)


def test_a_fresh_run_starts_its_embedding_from_the_text(tmp_path: Path) -> None:
    """By default the first step already sees names near names; `embedding_init="normal"` starts from the
    seeded random rows, as runs did before."""
    data = stories_file(tmp_path)
    ids = torch.from_numpy(np.unique(story_tokens(300)))
    fresh = train(quick_config(tmp_path, data, max_steps=1, eval_every=1, lr=1e-9, warmup_steps=0))
    embedding = load_model(fresh.run_dir / LATEST_DIR).embed_tokens.weight.detach()
    assert nearest_of_kind(embedding[ids], ids) == 1.0
    start = next(r for r in read_metrics(fresh.run_dir) if r["kind"] == "start")
    assert "co-occurrence vectors" in start_line(start) and start["embedding_from_text_s"] > 0
    config = quick_config(tmp_path, data, max_steps=1, eval_every=1, lr=1e-9, warmup_steps=0,
                          embedding_init="normal", out=str(tmp_path / "normal"))
    normal_run = train(config).run_dir
    normal = load_model(normal_run / LATEST_DIR).embed_tokens.weight.detach()
    start = next(r for r in read_metrics(normal_run) if r["kind"] == "start")
    assert start["embedding_from_text_s"] is None and "co-occurrence" not in start_line(start)
    random_start = build_model(config.model_config(), seed=config.seed).embed_tokens.weight.detach()
    torch.testing.assert_close(normal[ids], random_start[ids], atol=1e-6, rtol=0)
    assert nearest_of_kind(normal[ids], ids) < 0.5
