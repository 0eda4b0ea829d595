"""`train.py` as a user runs it: real subprocesses, real signals, real torchrun."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import PYTHON, REPO, stories_file, subprocess_env

from slm.config import preset
from slm.devices import native_bf16
from slm.loading import load_model
from slm.model import build_model
from slm.sampling import generate

TRAIN = str(REPO / "train.py")


def small_run_flags(tmp_path: Path) -> list[str]:
    return [
        "--preset", "tiny", "--data", str(stories_file(tmp_path)), "--context-length", "32", "--batch-size", "2",
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--lr", "1e-3",
    ]


def run_train(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, TRAIN, *args], capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
                          timeout=timeout)


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_help_lists_every_flag() -> None:
    result = run_train("--help")
    assert result.returncode == 0
    for flag in ("--preset", "--data", "--max-stories", "--max-steps", "--max-tokens", "--batch-size", "--grad-accum",
                 "--context-length", "--lr", "--min-lr", "--warmup-steps", "--out", "--resume", "--device",
                 "--compile", "--eval-every", "--save-every", "--seed", "--optimizer", "--beta1", "--beta2",
                 "--muon-momentum", "--late-beta1", "--late-beta2",
                 "--late-betas-from-pass"):
        assert flag in result.stdout, flag


def test_a_short_run_shows_progress_and_leaves_a_loadable_checkpoint_and_loss_plot(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_train(*small_run_flags(tmp_path), "--max-steps", "6", "--eval-every", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "training" in result.stderr and "6/6" in result.stderr  # the progress bar
    precision = "bf16 autocast" if native_bf16(torch.device("cpu")) else "fp32"
    assert "training on CPU (" in result.stdout and f" threads), {precision}: " in result.stdout
    assert "64 tokens per step" in result.stdout  # 2 x 32
    assert "finished at step 6/6" in result.stdout and "val loss" in result.stdout and str(out) in result.stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(out / "latest")
    assert model.config.context_length == 32 and model.config.hidden_size == 192  # tiny
    metadata = json.loads((out / "latest" / "metadata.json").read_text())
    assert metadata["step"] == 6 and metadata["preset"] == "tiny" and metadata["tokens"] == 6 * 2 * 32
    assert len(generate(model, [7454, 2402, 257, 640], max_new_tokens=5, temperature=0)) == 5
    assert load_model(out / "best").config == model.config


def test_ctrl_c_stops_after_the_current_step_saves_and_resume_continues(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [PYTHON, TRAIN, *small_run_flags(tmp_path), "--max-steps", "100000", "--log-every", "1",
               "--eval-every", "1000", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and len(train_steps(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "stop requested" in stdout and "stopped at step" in stdout and "--resume" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    end = records[-1]
    assert end["kind"] == "end" and end["reason"] == "stopped"
    stopped_at = end["step"]
    assert json.loads((out / "latest" / "training_state.json").read_text())["step"] == stopped_at
    load_model(out / "latest")

    resumed = run_train("--resume", str(out), "--max-steps", str(stopped_at + 3), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"finished at step {stopped_at + 3}" in resumed.stdout
    assert train_steps(out) == list(range(1, stopped_at + 4))


def test_bad_input_gets_one_clear_line_and_no_traceback(tmp_path: Path) -> None:
    missing = run_train("--data", str(tmp_path / "nope.txt"), "--max-steps", "1", "--out", str(tmp_path / "r"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "r" / "latest").exists()

    unknown = run_train("--preset", "huge", "--data", str(stories_file(tmp_path)))
    assert unknown.returncode == 2 and "unknown preset 'huge'" in unknown.stderr

    nothing = run_train("--resume", str(tmp_path / "not-a-run"))
    assert nothing.returncode == 2 and "not a run folder" in nothing.stderr


def test_resume_refuses_flags_that_would_make_it_another_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_train(*small_run_flags(tmp_path), "--max-steps", "2", "--out", str(out), "--quiet").returncode == 0
    changed = run_train("--resume", str(out), "--lr", "0.1", "--batch-size", "3")
    assert changed.returncode == 2 and "--batch-size, --lr cannot change when resuming" in changed.stderr


def test_torchrun_with_two_processes_makes_the_update_of_one_process_on_the_combined_batch(tmp_path: Path) -> None:
    """DDP over gloo: 2 ranks x batch 2 must train like 1 process x batch 4 (the same windows, averaged gradients)."""
    flags = [*small_run_flags(tmp_path), "--max-steps", "3", "--eval-every", "3", "--log-every", "1", "--quiet",
             "--optimizer", "adamw",  # Muon's Newton-Schulz iteration would magnify the all-reduce's rounding
             "--dtype", "fp32"]  # bf16 GEMMs of batch 2 and of batch 4 round differently
    flags[flags.index("--batch-size") + 1] = "2"
    ddp = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN, *flags,
         "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("finished at step 3/3") == 1  # rank 0 alone reports (and writes)
    flags[flags.index("--batch-size") + 1] = "4"
    single = run_train(*flags, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr

    def records(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "train"]

    a, b = records("ddp"), records("single")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] == [128, 256, 384]
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert a[-1]["val_loss"] == pytest.approx(b[-1]["val_loss"], rel=1e-5)  # the same fixed validation windows
    start = next(r for r in map(json.loads, (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "start")
    assert start["world_size"] == 2
    wa = load_file(str(tmp_path / "ddp" / "latest" / "model.safetensors"))
    wb = load_file(str(tmp_path / "single" / "latest" / "model.safetensors"))
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)
    initial = build_model(preset("tiny", context_length=32), seed=1337).export_state_dict()
    assert not torch.allclose(initial["layers.0.mlp.up_proj.weight"], wa["layers.0.mlp.up_proj.weight"], atol=1e-5)


def test_a_time_boxed_torchrun_run_agrees_on_its_schedule_across_ranks(tmp_path: Path) -> None:
    """Under torchrun the ranks follow one agreed share of the time budget (each rank's own clock would let one
    rank start the unlikelihood term's extra backward a step before the other): the run ends on its budget, the
    term runs on every step of the last part, and the last step is at min_lr."""
    flags = [*small_run_flags(tmp_path), "--max-time", "8s", "--unlikelihood", "1", "--unlikelihood-share", "0.5",
             "--warmup-steps", "2", "--eval-every", "1000", "--log-every", "1", "--quiet",
             "--out", str(tmp_path / "ddp")]
    ddp = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN, *flags],
                         capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("of a 0m08.0s budget") == 1
    records = [r for r in map(json.loads, (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"]
    with_term = [r["unlikelihood"] is not None for r in records]
    first = with_term.index(True)
    assert first > 0 and all(with_term[first:])  # the last part of the budget, on every step from there
    assert records[-1]["lr"] == 0.0  # the decay ends at the end of the budget


def test_max_time_trains_for_a_wall_clock_budget_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "timed"
    result = run_train(*small_run_flags(tmp_path), "--max-time", "4s", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "of a 0m04.0s budget" in result.stdout and "bits/byte" in result.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["max_time"] == 4.0 and run["max_steps"] is None
    assert (out / "latest" / "training_state.json").is_file()


def test_max_time_that_is_not_a_duration_is_refused_clearly(tmp_path: Path) -> None:
    result = run_train(*small_run_flags(tmp_path), "--max-time", "soon", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "--max-time" in result.stderr and "10m" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
