"""Sequence-level unlikelihood: which tokens count as repeats, the term itself, and a run that uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import TINY_MODEL, quick_config, stories_file

from slm.config import preset
from slm.engine import generate
from slm.loading import load_model
from slm.model import build_model
from slm.tokenizer import load_tokenizer
from slm.train_config import TrainConfig, resume_config
from slm.training import read_metrics, train
from slm.unlikelihood import continuation_lengths, repeated_ngram_mask


def test_a_repeat_is_a_token_that_completes_an_earlier_ngram_of_its_row() -> None:
    rows = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 1, 5, 6, 7, 8],
                         [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    mask = repeated_ngram_mask(rows, start=0, n=4)
    assert mask[0].nonzero().flatten().tolist() == [8, 13]  # "5 6 7 8" again, twice
    assert not mask[1].any()  # no 4-gram repeats; the rows are independent
    assert repeated_ngram_mask(rows, start=9, n=4)[0].nonzero().flatten().tolist() == [13]  # the prefix is never marked
    assert repeated_ngram_mask(rows, start=0, n=2)[0].nonzero().flatten().tolist() == [6, 7, 8, 11, 12, 13]
    assert not repeated_ngram_mask(rows, start=0, n=8).any()  # a repeated phrase of four is not a loop of eight
    loop = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4]])  # "1 2 3 4 5" over and over
    assert repeated_ngram_mask(loop, start=0, n=8)[0].nonzero().flatten().tolist() == [12, 13]
    assert continuation_lengths(256) == (32, 48) and continuation_lengths(32) == (10, 22)


def test_the_term_is_minus_log_one_minus_p_at_the_marked_tokens_and_lowers_them() -> None:
    torch.manual_seed(0)
    model = build_model(preset("tiny", **TINY_MODEL, context_length=32), seed=0)
    ids = torch.randint(0, 50_000, (2, 12))
    marked = torch.zeros(2, 11, dtype=torch.bool)
    marked[0, 5], marked[1, 9], marked[1, 10] = True, True, True
    term = model.unlikelihood_loss(ids[:, :-1], ids[:, 1:], marked, start=4)
    p = model(ids[:, :-1]).float().softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = -torch.log1p(-p[marked]).mean()
    assert term.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.unlikelihood_loss(ids[:, :-1], ids[:, 1:], torch.zeros_like(marked)).item() == 0.0
    term.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 50.0 * param.grad
        after = model(ids[:, :-1]).float().softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (after[marked] < p[marked]).all()


def greedy_repeat_share(run_dir: Path) -> float:
    """The share of tokens of greedy continuations that complete an earlier 4-gram."""
    model, tokenizer = load_model(run_dir / "latest"), load_tokenizer()
    shares = []
    for prompt in ("Once upon a time, there was", "One day, Tom saw a big", "They played together all day.",
                   "Lily liked to play in the"):
        ids = torch.tensor([tokenizer.encode(prompt)])
        continued = torch.cat((ids, generate(model, ids, 40, temperature=0.0)), dim=1)
        shares.append(repeated_ngram_mask(continued, ids.shape[1], n=4)[:, ids.shape[1]:].float().mean().item())
    return sum(shares) / len(shares)


def test_a_run_with_unlikelihood_adds_it_late_and_its_greedy_text_repeats_less(tmp_path: Path) -> None:
    data = stories_file(tmp_path, count=40)
    runs = {}
    for weight in (0.0, 1.0):
        config = quick_config(tmp_path / str(weight), data, max_steps=60, unlikelihood=weight, unlikelihood_share=0.5,
                              sample_tokens=0, eval_every=100, log_every=1)
        runs[weight] = train(config)
    records = [r for r in read_metrics(runs[1.0].run_dir) if r["kind"] == "train"]
    on = [r["step"] for r in records if r["unlikelihood"] is not None]
    assert on == list(range(on[0], 61)) and 30 < on[0] <= 33  # the last half of the steps after the warmup
    assert all(r["unlikelihood"] is None for r in read_metrics(runs[0.0].run_dir) if r["kind"] == "train")
    plain, trained_away = greedy_repeat_share(runs[0.0].run_dir), greedy_repeat_share(runs[1.0].run_dir)
    assert plain > 0.5  # this small model on this small text loops ...
    assert trained_away < 0.85 * plain  # ... and the term trains it out of part of that
    assert abs(runs[1.0].val_loss - runs[0.0].val_loss) < 0.2  # without giving up what it learned
    saved = json.loads((runs[1.0].run_dir / "run.json").read_text())
    assert saved["unlikelihood"] == 1.0 and saved["unlikelihood_share"] == 0.5


def test_the_term_is_on_by_default_and_runs_recorded_before_keep_what_they_ran_with(tmp_path: Path) -> None:
    assert (TrainConfig().unlikelihood, TrainConfig().unlikelihood_ngram) == (0.3, 8)
    record = TrainConfig(data="x.txt", max_steps=7).to_dict()
    for name in ("unlikelihood", "unlikelihood_share", "unlikelihood_ngram"):  # recorded before the term existed
        del record[name]
    (tmp_path / "run.json").write_text(json.dumps(record))
    assert resume_config(tmp_path).unlikelihood == 0.0
    record.update(unlikelihood=0.3, unlikelihood_share=0.1)  # recorded with the term, when it marked 4-grams
    (tmp_path / "run.json").write_text(json.dumps(record))
    resumed = resume_config(tmp_path)
    assert (resumed.unlikelihood, resumed.unlikelihood_ngram) == (0.3, 4)


def test_unlikelihood_trains_in_mixed_precision_too(tmp_path: Path) -> None:
    config = quick_config(tmp_path, stories_file(tmp_path, count=10), max_steps=4, unlikelihood=1.0,
                          unlikelihood_share=1.0, dtype="bf16", sample_tokens=0)
    records = [r for r in read_metrics(train(config).run_dir) if r["kind"] == "train"]
    assert all(r["unlikelihood"] is not None for r in records if r["step"] > 2)  # after the warmup


def test_bad_unlikelihood_settings_are_refused() -> None:
    for field, bad in (("unlikelihood", -1.0), ("unlikelihood", float("nan")), ("unlikelihood_share", 1.5),
                       ("unlikelihood_ngram", 1), ("unlikelihood_ngram", 4.5), ("unlikelihood_ngram", True)):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**{field: bad})
