"""The training loop, in-process on CPU: schedule, accumulation, learning, resume, stop, checkpoints."""

from __future__ import annotations

import itertools
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import TINY_MODEL, make_stories, quick_config, stories_file, write_raw_txt

from slm.data import DataSpec, prepare_data
from slm.devices import native_bf16
from slm.loading import list_checkpoints, load_model
from slm.optim import lr_at, lr_factor, step_progress, warmup_factor
from slm.tokenizer import load_tokenizer
from slm.train_config import TrainConfig, resume_config
from slm.training import read_metrics, train


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


# ----- config ---------------------------------------------------------------------------------------
def test_config_round_trips_through_json(tmp_path: Path) -> None:
    config = TrainConfig(preset="small", model={"num_layers": 3}, data="x.txt", max_steps=7, lr=2e-3, optimizer="muon")
    config.save(tmp_path / "run.json")
    assert TrainConfig.load(tmp_path / "run.json") == config


def test_resuming_a_run_recorded_before_a_field_existed_keeps_what_it_ran_with(tmp_path: Path) -> None:
    record = TrainConfig(data="x.txt", max_steps=7).to_dict()
    # runs recorded before dropout (of the branches, of the input), Muon's momentum knob and AdamW's late betas
    for name in ("dropout", "dropout_from_pass", "embedding_dropout", "muon_momentum", "late_betas_from_pass"):
        del record[name]
    (tmp_path / "run.json").write_text(json.dumps(record))
    resumed = resume_config(tmp_path)
    assert resumed.dropout_from_pass == 2  # dropout once had no pass of its own: the second
    assert (resumed.dropout, resumed.embedding_dropout, resumed.muon_momentum) == (0.0, 0.0, 0.95)
    assert resumed.adamw_betas(epoch=3) == resumed.adamw_betas(epoch=0) == (resumed.beta1, resumed.beta2)
    assert (TrainConfig().dropout, TrainConfig().embedding_dropout, TrainConfig().muon_momentum) \
        != (0.0, 0.0, 0.95)  # not today's defaults
    assert TrainConfig().adamw_betas(epoch=3) != TrainConfig().adamw_betas(epoch=0)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("min_lr", 1e-3, "below lr"),
        ("preset", "huge", "unknown preset"),
        ("optimizer", "sgd", "optimizer"),
        ("batch_size", 0, "positive integer"),
        ("lr", float("nan"), "positive number"),
        ("muon_momentum", 1.0, r"muon_momentum must be in \[0, 1\)"),
        ("late_beta2", 1.0, r"late_beta2 must be in \[0, 1\)"),
        ("late_betas_from_pass", -1, "late_betas_from_pass must be a pass number"),
    ],
)
def test_config_rejects_values_a_run_cannot_use(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        TrainConfig(**{"lr": 1e-3, field: value})


# ----- schedule ------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr() -> None:
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 111  # 100 decay steps after the peak
    values = [lr_at(s, lr, min_lr, warmup, total) for s in range(total)]
    assert values[:warmup] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)])
    assert max(values) == pytest.approx(lr) and values[warmup] == pytest.approx(lr)
    decay = values[warmup:]
    assert all(a > b for a, b in itertools.pairwise(decay))  # strictly falling after the peak
    assert values[-1] == pytest.approx(min_lr)
    assert values[warmup + 50] == pytest.approx(min_lr + 0.5 * (lr - min_lr))  # cosine midpoint
    assert min(values[warmup:]) >= min_lr


def test_schedule_advances_once_per_optimizer_step_not_per_micro_batch(tmp_path: Path) -> None:
    config = quick_config(tmp_path, stories_file(tmp_path), grad_accum=3, max_steps=6, warmup_steps=2, eval_every=6)
    train(config)
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert config.schedule == "wsd"  # the default: warmup 2 steps, hold, then linear to 0 over the last part
    decay = config.decay_fraction
    expected = [config.lr * (warmup_factor(s, 2) if s < 2 else lr_factor(step_progress(s, 2, 6), 0.0, "wsd", decay))
                for s in range(6)]
    assert expected[-1] == 0.0 and expected[1] == expected[2] == config.lr
    assert [r["lr"] for r in records] == pytest.approx(expected)
    assert records[-1]["tokens"] == 6 * 3 * config.batch_size * config.context_length
    state = load_file(str(tmp_path / "run" / "latest" / "training_state.safetensors"))
    adam_steps = {float(v) for k, v in state.items() if k.startswith("optimizer.0.") and k.endswith(".step")}
    assert adam_steps == {6.0}


def test_one_batch_equals_two_accumulated_half_batches(tmp_path: Path) -> None:
    data = stories_file(tmp_path)
    # AdamW: Muon's Newton-Schulz iteration magnifies float-rounding differences between the
    # two ways of summing the gradient into visible ones (the bitwise resume test covers Muon)
    whole = train(quick_config(tmp_path, data, out=str(tmp_path / "whole"), batch_size=8, grad_accum=1,
                               max_steps=3, eval_every=3, optimizer="adamw"))
    halves = train(quick_config(tmp_path, data, out=str(tmp_path / "halves"), batch_size=4, grad_accum=2,
                                max_steps=3, eval_every=3, optimizer="adamw"))
    assert whole.tokens == halves.tokens
    a, b = train_records(whole.run_dir), train_records(halves.run_dir)
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    wa = load_file(str(whole.run_dir / "latest" / "model.safetensors"))
    wb = load_file(str(halves.run_dir / "latest" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=1e-4)


# ----- learning ------------------------------------------------------------------------------------
def test_tiny_preset_learns_well_below_unigram_entropy(tmp_path: Path) -> None:
    data = write_raw_txt(tmp_path / "stories.txt", make_stories(400, seed=1))
    config = quick_config(
        tmp_path, data, model={}, context_length=64, batch_size=4, max_steps=60, lr=1e-2, warmup_steps=4,
        eval_every=60, log_every=10, sample_tokens=0, dtype="auto",
    )
    result = train(config)
    tokens = prepare_data(config.data_spec(), load_tokenizer(), config.cache_dir).train  # the run's own tokens
    p = np.bincount(tokens.astype(np.int64)).astype(np.float64)
    p = p[p > 0] / tokens.size
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats: the best loss a model without context can reach
    first = train_records(result.run_dir)[0]["train_loss"]
    assert first > 10.0  # starts near ln(50257) = 10.8
    start = next(r for r in read_metrics(result.run_dir) if r["kind"] == "start")
    assert start["precision"] == ("bfloat16" if native_bf16(torch.device("cpu")) else "float32")
    assert result.val_loss < unigram_entropy - 1.0, (result.val_loss, unigram_entropy)
    assert result.train_loss < unigram_entropy - 1.0


def test_a_fresh_run_trains_its_texts_ids_and_one_shared_row_for_the_rest(tmp_path: Path) -> None:
    """The vocabulary shortcut (slm.losses.TrainingVocabulary), through a run, a save and a resume."""
    config = quick_config(tmp_path, stories_file(tmp_path), max_steps=6, eval_every=3)
    first = train(config)
    used = np.unique(prepare_data(config.data_spec(), load_tokenizer(), config.cache_dir).train).astype(np.int64)
    start = next(r for r in read_metrics(first.run_dir) if r["kind"] == "start")
    assert start["trained_columns"] == used.size + 1 and start["vocabulary"] == 50257
    unused = np.setdiff1d(np.arange(50257), used)
    weights = load_file(str(first.run_dir / "latest" / "model.safetensors"))["embed_tokens.weight"]
    rest = weights[torch.from_numpy(unused)]
    assert torch.equal(rest, rest[:1].expand_as(rest)) and rest[0].abs().sum() > 0  # shared, and trained
    assert len({tuple(row.tolist()) for row in weights[torch.from_numpy(used)]}) == used.size  # each its own
    resumed = train(resume_config(first.run_dir, max_steps=9))
    starts = [r for r in read_metrics(resumed.run_dir) if r["kind"] == "start"]
    assert [r["trained_columns"] for r in starts] == [used.size + 1] * 2
    assert resumed.step == 9


# ----- resume and stop -----------------------------------------------------------------------------
class StopOneStepLater(threading.Event):
    """Once set, lets one more step run before reporting the stop: the run then stops between two
    log steps, with a half-filled loss accumulator that the resume must restore."""

    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    def is_set(self) -> bool:
        if not super().is_set():
            return False
        self.polls += 1
        return self.polls > 1


@pytest.mark.parametrize(("optimizer", "dtype", "unlikelihood"),
                         [("adamw", "fp32", 0.0), ("muon", "fp32", 0.0), ("muon", "auto", 0.0), ("muon", "fp32", 1.0)])
def test_stop_and_resume_reproduce_an_uninterrupted_run_bit_for_bit(
    tmp_path: Path, optimizer: str, dtype: str, unlikelihood: float
) -> None:
    """"auto": bf16 autocast on a CPU with bf16 instructions (AVX512-BF16, AMX), else fp32. With the
    unlikelihood term from step 2 on, the stop falls inside a record's interval of steps with the term."""
    steps = 10
    settings = dict(max_steps=steps, log_every=3, eval_every=4, optimizer=optimizer, dtype=dtype)
    if unlikelihood:
        settings.update(unlikelihood=unlikelihood, unlikelihood_share=0.9, warmup_steps=1)
    straight = train(quick_config(tmp_path, stories_file(tmp_path), out=str(tmp_path / "straight"), **settings))
    event = StopOneStepLater()

    def on_metrics(record: dict) -> None:
        if record.get("kind") == "train" and record["step"] == 4:
            event.set()

    first = train(quick_config(tmp_path, stories_file(tmp_path), out=str(tmp_path / "split"), **settings),
                  on_metrics=on_metrics, stop_event=event)
    assert first.stopped and first.step == 5  # step 5 is not a log step
    resumed = train(resume_config(tmp_path / "split"))
    assert not resumed.stopped and resumed.step == steps

    a, b = train_records(straight.run_dir), train_records(resumed.run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in ("train_loss", "val_loss", "lr", "grad_norm", "tokens", "unlikelihood"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa = load_file(str(straight.run_dir / "latest" / "model.safetensors"))
    wb = load_file(str(resumed.run_dir / "latest" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = load_file(str(straight.run_dir / "latest" / "training_state.safetensors"))
    sb = load_file(str(resumed.run_dir / "latest" / "training_state.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(("optimizer.", "sampler.")))
    ends = [r for r in read_metrics(resumed.run_dir) if r["kind"] == "end"]
    assert [e["reason"] for e in ends] == ["stopped", "finished"]


def test_a_run_resumes_with_the_model_it_saved_after_its_preset_changed(tmp_path: Path) -> None:
    first = train(quick_config(tmp_path, stories_file(tmp_path), max_steps=4))
    # a record from when the preset's width was TINY_MODEL's: today's preset is wider
    record = json.loads((first.run_dir / "run.json").read_text())
    del record["model"]["hidden_size"]
    (first.run_dir / "run.json").write_text(json.dumps(record))
    assert resume_config(first.run_dir).model_config().hidden_size != TINY_MODEL["hidden_size"]

    resumed = train(resume_config(first.run_dir, max_steps=6))
    assert resumed.step == 6
    assert load_model(resumed.run_dir / "latest").config.hidden_size == TINY_MODEL["hidden_size"]


def test_stop_file_ends_the_run_after_the_current_step_with_a_loadable_checkpoint(
    tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"

    def on_metrics(record: dict) -> None:
        if record.get("kind") == "train" and record["step"] == 3:
            (run_dir / "STOP").touch()

    result = train(quick_config(tmp_path, stories_file(tmp_path), max_steps=50), on_metrics=on_metrics)
    assert result.stopped and result.step == 3
    assert not (run_dir / "STOP").exists()  # consumed, so a resume does not stop at once
    model = load_model(run_dir / "latest")
    assert json.loads((run_dir / "latest" / "metadata.json").read_text())["step"] == 3
    assert model.config.hidden_size == TINY_MODEL["hidden_size"]


def test_run_folder_holds_metrics_samples_best_and_latest(tmp_path: Path) -> None:
    seen = []
    result = train(quick_config(tmp_path, stories_file(tmp_path), max_steps=8, eval_every=4), on_metrics=seen.append)
    records = read_metrics(result.run_dir)
    assert records == seen  # the callback receives exactly what the file holds
    assert [r["kind"] for r in records][:2] == ["preparing", "start"]
    train_rows = [r for r in records if r["kind"] == "train"]
    for row in train_rows:
        assert {"step", "tokens", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                "elapsed_s", "eta_s"} <= set(row)
        assert row["mfu"] is None  # no known peak for a CPU
    evals = [r for r in train_rows if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[0]["val_perplexity"] == pytest.approx(math.exp(evals[0]["val_loss"]))
    samples = [r for r in records if r["kind"] == "sample"]
    assert [s["step"] for s in samples] == [4, 8] and all(s["text"].startswith("Once upon a time") for s in samples)
    best = json.loads((result.run_dir / "best" / "metadata.json").read_text())
    assert best["val_loss"] == min(r["val_loss"] for r in evals) == result.best_val_loss
    assert TrainConfig.load(result.run_dir / "run.json").max_steps == 8
    found = {info.path.name: info for info in list_checkpoints(tmp_path)}
    assert found["latest"].step == 8 and found["best"].val_loss == best["val_loss"]


def test_the_same_seed_gives_the_same_run_and_another_seed_does_not(tmp_path: Path) -> None:
    runs = [train(quick_config(tmp_path, stories_file(tmp_path), out=str(tmp_path / f"r{i}"), seed=seed, max_steps=3,
                               sample_tokens=0)) for i, seed in enumerate((1, 1, 2))]
    losses = [[r["train_loss"] for r in train_records(run.run_dir)] for run in runs]
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slm.training

    real_save = slm.training.save_file
    calls = []

    def failing_save(tensors: dict, path: str) -> None:
        calls.append(path)
        if len(calls) == 2:
            real_save(dict(list(tensors.items())[:3]), path)  # a partial file, then the "crash"
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(slm.training, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(quick_config(tmp_path, stories_file(tmp_path), max_steps=8, save_every=3, eval_every=8))
    latest = tmp_path / "run" / "latest"
    assert json.loads((latest / "training_state.json").read_text())["step"] == 3
    load_model(latest)
    errors = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "error"]
    assert errors and "disk full" in errors[-1]["message"]
    resumed = train(resume_config(tmp_path / "run"))  # and the run continues from step 3
    assert resumed.step == 8 and [r["step"] for r in train_records(tmp_path / "run")][:3] == [1, 2, 3]


def test_a_run_folder_is_never_overwritten_and_resume_needs_a_saved_state(
    tmp_path: Path
) -> None:
    train(quick_config(tmp_path, stories_file(tmp_path), max_steps=2, eval_every=2))
    with pytest.raises(FileExistsError, match="resume"):
        train(quick_config(tmp_path, stories_file(tmp_path), max_steps=2))
    (tmp_path / "empty").mkdir()
    TrainConfig(out=str(tmp_path / "empty")).save(tmp_path / "empty" / "run.json")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(resume_config(tmp_path / "empty"))


def test_max_tokens_sets_the_number_of_steps(tmp_path: Path) -> None:
    config = quick_config(
        tmp_path, stories_file(tmp_path), max_steps=None, max_tokens=500, batch_size=4, context_length=32
    )
    result = train(config)
    assert result.max_steps == math.ceil(500 / (4 * 32)) == result.step


def test_held_out_validation_and_a_separate_validation_file(tmp_path: Path) -> None:
    train_file = write_raw_txt(tmp_path / "train.txt", make_stories(100, seed=3))
    val_file = write_raw_txt(tmp_path / "val.txt", make_stories(20, seed=4))
    result = train(quick_config(tmp_path, train_file, val_data=str(val_file), max_steps=2, eval_every=2))
    prepared = prepare_data(DataSpec(str(train_file), val_source=str(val_file)), load_tokenizer(), tmp_path / "cache")
    assert prepared.reused and prepared.meta["train_stories"] == 100 and prepared.meta["val_stories"] == 20
    start = next(r for r in read_metrics(result.run_dir) if r["kind"] == "start")
    assert start["val_tokens"] == prepared.val.size
