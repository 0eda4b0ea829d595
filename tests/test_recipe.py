"""The training recipe's pieces a user notices: the time budget, bits per byte, the samples a run
keeps, and the schedule's shape."""

from __future__ import annotations

import itertools
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from training_helpers import quick_config, stories_file

from slm.loading import load_model
from slm.metrics import LN2, bits_per_byte, target_bytes
from slm.model import branch_dropout
from slm.muon import Muon, orthogonalize
from slm.optim import lr_factor
from slm.tokenizer import load_tokenizer
from slm.train_config import TrainConfig, parse_duration
from slm.training import SAMPLE_PROMPTS, SAMPLES_FILE, read_metrics, train


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


# ----- Muon ----------------------------------------------------------------------------------------
def test_orthogonalized_updates_have_all_singular_values_near_one() -> None:
    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64), (3, 48, 192)]:  # wide, tall, and a batch of matrices
        g = torch.randn(shape) * torch.logspace(-1, 0, shape[-1])  # unevenly scaled columns
        s = torch.linalg.svdvals(orthogonalize(g))
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s.min(), s.max())


def test_our_muon_takes_the_steps_of_torchs_muon() -> None:
    """Same update rule as torch.optim.Muon (nesterov momentum, decoupled decay, AdamW-matched RMS):
    the parameters after three steps differ only by torch's bf16 iteration's rounding."""
    torch.manual_seed(0)
    shapes = [(64, 256), (64, 256), (256, 64)]
    ours = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    starts = [p.detach().clone() for p in ours]
    a = Muon(ours, lr=1e-2, weight_decay=0.1)
    b = torch.optim.Muon(theirs, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, start in zip(ours, theirs, starts, strict=True):
        moved = (p - start).detach()
        assert moved.pow(2).mean().sqrt() > 0.2 * 1e-2  # each step has AdamW's RMS, 0.2 x lr
        assert (p - q).norm() < 0.05 * moved.norm()


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_muon_iterates_in_the_precision_the_run_trains_in_with_its_momentum(dtype: str, expected: torch.dtype) -> None:
    from slm import build_model, preset
    from slm.optim import build_optimizers

    config = TrainConfig(dtype=dtype, device="cpu", muon_momentum=0.8)
    model = build_model(preset("tiny", num_layers=2), seed=0)
    muon = next(o for o in build_optimizers(model, config, torch.device("cpu")) if isinstance(o, Muon))
    assert muon.ns_dtype == expected
    assert {g["momentum"] for g in muon.param_groups} == {0.8}


# ----- schedule ------------------------------------------------------------------------------------
def test_wsd_holds_the_peak_then_falls_linearly_to_min_lr_at_the_end() -> None:
    values = [lr_factor(p / 100, 0.05, "wsd", 0.3) for p in range(101)]
    assert values[:71] == [1.0] * 71  # stable for the first 70%
    assert all(a > b for a, b in itertools.pairwise(values[70:]))  # then strictly falling
    assert values[85] == pytest.approx(1 - 0.95 * 0.5)  # linear: halfway down halfway through the decay
    assert values[-1] == pytest.approx(0.05)


def test_durations_read_as_seconds() -> None:
    assert [parse_duration(t) for t in ("300", "90s", "10m", "1h", "1.5m")] == [300, 90, 600, 3600, 90]
    for bad in ("soon", "-5m", "0", ""):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


# ----- time budget ---------------------------------------------------------------------------------
def time_config(tmp_path: Path, seconds: float, **overrides) -> TrainConfig:
    values = dict(max_steps=None, max_time=seconds, eval_every=None, save_every=None, log_every=1,
                  min_lr=3e-4, warmup_steps=0, sample_tokens=0)
    values.update(overrides)
    return quick_config(tmp_path, stories_file(tmp_path), **values)


def test_a_time_budget_stops_the_run_on_time_saves_it_and_ends_the_schedule_at_min_lr(tmp_path: Path) -> None:
    config = time_config(tmp_path, 6.0, schedule="wsd")
    result = train(config)
    records = train_records(result.run_dir)
    assert not result.stopped and result.max_steps is None and result.max_time == 6.0
    assert result.step == records[-1]["step"] >= 2
    assert 3.0 <= result.elapsed_s <= 6.0 + 60  # used its budget, and did not run on without end
    assert records[-1]["lr"] == pytest.approx(config.min_lr)  # the decay lands on the last step
    assert records[0]["lr"] == pytest.approx(config.lr)  # no warmup: the first step at the peak (wsd holds it)
    assert any(r["val_loss"] is not None for r in records[:-1])  # evaluated during the budget, not only at its end
    assert json.loads((result.run_dir / "latest" / "metadata.json").read_text())["step"] == result.step
    assert load_model(result.run_dir / "latest") is not None


def test_a_budget_that_ends_inside_the_warmup_still_ends_at_min_lr(tmp_path: Path) -> None:
    config = time_config(tmp_path, 3.0, warmup_steps=10_000, min_lr=0.0)
    records = train_records(train(config).run_dir)
    assert 0 < records[0]["lr"] < records[-2]["lr"] < 0.1 * config.lr  # still warming up ...
    assert records[-1]["lr"] == 0.0  # ... until the step that spends the budget


def test_a_time_budget_warms_up_over_its_first_twentieth_of_time(tmp_path: Path) -> None:
    """With no step count to take 5% of, the warmup follows the clock, as the decay does."""
    config = time_config(tmp_path, 8.0, warmup_steps=None, schedule="wsd")
    result = train(config)
    assert TrainConfig.load(result.run_dir / "run.json").warmup_steps is None  # resumes warming up by time too
    records = train_records(result.run_dir)
    warming = [r for r in records if r["lr"] < config.lr * (1 - 1e-6) and r["elapsed_s"] < 0.5 * 8.0]
    assert warming and warming[0]["step"] == 1 and warming[0]["lr"] < 0.5 * config.lr
    assert [r["lr"] for r in warming] == sorted(r["lr"] for r in warming)  # rising ...
    assert all(r["elapsed_s"] <= 0.05 * 8.0 + 0.5 for r in warming)  # ... for the first 5% of the time
    assert any(r["lr"] == pytest.approx(config.lr) for r in records)  # then at the peak until the decay
    assert records[-1]["lr"] == pytest.approx(config.min_lr)


def test_resuming_a_time_boxed_run_continues_the_same_budget(tmp_path: Path) -> None:
    stop = threading.Event()

    def on_metrics(record: dict) -> None:
        if record.get("kind") == "train" and record["step"] == 3:
            stop.set()

    first = train(time_config(tmp_path, 8.0), on_metrics=on_metrics, stop_event=stop)
    assert first.stopped and first.elapsed_s < 8.0
    saved = json.loads((first.run_dir / "latest" / "training_state.json").read_text())["elapsed_s"]
    assert 0 < saved <= first.elapsed_s  # the clock as saved (the final save itself is not charged)
    resumed = train(TrainConfig.from_dict({**TrainConfig.load(first.run_dir / "run.json").to_dict(), "resume": True}))
    assert not resumed.stopped and resumed.step > first.step
    records = train_records(resumed.run_dir)
    after = [r for r in records if r["step"] > first.step]
    assert after[0]["elapsed_s"] > saved  # the clock continues from where it stopped
    assert 4.0 <= resumed.elapsed_s <= 8.0 + 60
    assert after[-1]["lr"] == pytest.approx(3e-4)


# ----- bits per byte -------------------------------------------------------------------------------
TEXT = "Lily saw a café — «très jolie» 🙂 and said: naïve 日本語! " * 3


def test_token_byte_lengths_count_the_utf8_bytes_of_multibyte_text() -> None:
    tokenizer = load_tokenizer()
    ids = torch.tensor(tokenizer.encode(TEXT))
    lengths = tokenizer.token_byte_lengths()
    assert lengths.shape == (tokenizer.vocab_size,) and lengths.dtype == torch.int64
    assert int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))  # an emoji split over tokens counts once
    assert target_bytes(ids, lengths) == len(TEXT.encode("utf-8"))
    assert lengths[tokenizer.eot_id] == 0  # end-of-text stands for no text


def test_bits_per_byte_is_the_loss_in_bits_times_tokens_per_byte() -> None:
    tokenizer = load_tokenizer()
    ids = torch.tensor([tokenizer.encode(TEXT)])
    model = load_model_for_test()
    with torch.no_grad():
        logits = model(ids[:, :-1])
        nats = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
    targets = ids[0, 1:]
    target_text_bytes = len(tokenizer.decode(targets.tolist()).encode("utf-8"))
    mean_loss = nats / targets.numel()
    assert target_bytes(targets, tokenizer.token_byte_lengths()) == target_text_bytes
    assert bits_per_byte(nats, target_text_bytes) == pytest.approx(
        mean_loss / math.log(2) * targets.numel() / target_text_bytes
    )
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def load_model_for_test():
    from slm.config import preset
    from slm.model import build_model

    return build_model(preset("tiny", num_layers=1, context_length=64), device="cpu", seed=0).eval()


def test_runs_record_bits_per_byte_in_metrics_and_checkpoint_metadata(tmp_path: Path) -> None:
    result = train(quick_config(tmp_path, stories_file(tmp_path), max_steps=4, eval_every=4, sample_tokens=0))
    last = train_records(result.run_dir)[-1]
    assert last["val_bpb"] is not None and last["train_bpb"] is not None
    # nats per token -> bits per byte: a GPT-2 token of English holds a few bytes
    assert 0.1 < last["val_bpb"] * LN2 / last["val_loss"] < 1.0
    assert result.val_bpb == last["val_bpb"]
    metadata = json.loads((result.run_dir / "latest" / "metadata.json").read_text())
    assert metadata["val_bpb"] == pytest.approx(last["val_bpb"])


# ----- samples -------------------------------------------------------------------------------------
def test_every_evaluation_keeps_greedy_and_sampled_continuations_with_their_step(tmp_path: Path) -> None:
    result = train(quick_config(tmp_path, stories_file(tmp_path), max_steps=8, eval_every=4, sample_tokens=6))
    samples = read_metrics(result.run_dir, SAMPLES_FILE)
    assert sorted({s["step"] for s in samples}) == [4, 8]
    for step in (4, 8):
        kept = {(s["prompt"], s["mode"]) for s in samples if s["step"] == step}
        assert kept == {(p, m) for p in SAMPLE_PROMPTS for m in ("greedy", "sampled")}
    for s in samples:
        assert s["text"].startswith(s["prompt"]) and len(s["text"]) > len(s["prompt"])


# ----- dropout -------------------------------------------------------------------------------------
def test_dropout_and_the_late_betas_start_with_their_pass_and_act_in_training_only(tmp_path: Path) -> None:
    config = quick_config(tmp_path, stories_file(tmp_path, count=40), max_steps=30, dropout=0.2, dropout_from_pass=2,
                          embedding_dropout=0.3, embedding_dropout_from_pass=2, beta1=0.8, beta2=0.999,
                          late_beta1=0.85, late_beta2=0.9, late_betas_from_pass=2)
    result = train(config)
    records = train_records(result.run_dir)
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 2  # it still learns
    assert {r["epoch"] for r in records} >= {0, 1}  # the test text comes round within the run
    assert all(r["dropout"] == (0.2 if r["epoch"] >= 1 else 0.0) for r in records)
    assert all(r["embedding_dropout"] == (0.3 if r["epoch"] >= 1 else 0.0) for r in records)
    assert all(r["betas"] == ([0.85, 0.9] if r["epoch"] >= 1 else [0.8, 0.999]) for r in records)
    # the optimizer itself stepped with them: its saved state, after a last step in a later pass
    adamw_groups = json.loads((result.run_dir / "latest" / "training_state.json").read_text())["param_groups"][0]
    assert records[-1]["epoch"] >= 1
    assert [g["betas"] for g in adamw_groups] == [[0.85, 0.9]] * len(adamw_groups)
    model = load_model(result.run_dir / "latest")
    assert model is not None
    model.train()  # even in training mode, nothing outside the training loss drops anything
    ids = torch.tensor([load_tokenizer().encode("Once upon a time, there was a little")])
    assert torch.equal(model(ids), model(ids))
    targets = ids.roll(-1, 1)
    torch.manual_seed(0)
    dropped = model.loss(ids, targets, dropout=0.2)
    torch.manual_seed(0)
    assert model.loss(ids, targets, dropout=0.2) == dropped != model.loss(ids, targets)
    torch.manual_seed(0)
    dropped_input = model.loss(ids, targets, embedding_dropout=0.3)
    torch.manual_seed(0)
    assert model.loss(ids, targets, embedding_dropout=0.3) == dropped_input not in (dropped, model.loss(ids, targets))
    kept = branch_dropout(torch.ones(1000, 1000), 0.1)
    assert (kept == 0).float().mean().item() == pytest.approx(26 / 256, abs=2e-3)  # the rate, to 1/256
    assert kept.mean().item() == pytest.approx(1.0, abs=5e-3)  # the expectation is kept
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="dropout"):
            TrainConfig(dropout=bad)
        with pytest.raises(ValueError, match="embedding_dropout"):
            TrainConfig(embedding_dropout=bad)
    # each from its own pass on (1-based); 0 = never
    late = TrainConfig(dropout=0.1, dropout_from_pass=2, embedding_dropout=0.3, embedding_dropout_from_pass=4)
    rates = [late.dropout_rates(epoch) for epoch in range(5)]
    assert rates == [(0.0, 0.0), (0.1, 0.0), (0.1, 0.0), (0.1, 0.3), (0.1, 0.3)]
    assert TrainConfig(embedding_dropout_from_pass=0).dropout_rates(9)[1] == 0.0
    assert TrainConfig(dropout_from_pass=0).dropout_rates(9)[0] == 0.0
    assert TrainConfig(dropout_from_pass=1, embedding_dropout_from_pass=1).dropout_rates(0) == (0.1, 0.2)
    for name in ("dropout_from_pass", "embedding_dropout_from_pass"):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: -1})
