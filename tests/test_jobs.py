"""The background TrainingManager with real worker processes: start, poll, stop, resume, failures."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from training_helpers import quick_config, stories_file

from slm.jobs import JobStatus, TrainingBusyError, TrainingManager
from slm.loading import load_model


@pytest.fixture
def new_manager():
    """TrainingManager factory; a job a failing test leaves running is stopped (these runs are 100k steps)."""
    made: list[TrainingManager] = []

    def make(runs: Path) -> TrainingManager:
        made.append(TrainingManager(runs))
        return made[-1]

    yield make
    for manager in made:
        if manager.stop() and manager.wait(timeout=60).active:
            os.kill(json.loads((Path(manager.status().run_dir) / "job.json").read_text())["pid"], signal.SIGKILL)


def wait_for(manager: TrainingManager, condition, timeout: float = 120) -> JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = manager.status()
        if condition(status):
            return status
        assert time.monotonic() < deadline, f"timed out; last status {status}"
        assert status.state not in ("failed",), status.message
        time.sleep(0.2)


def long_config(tmp_path: Path, **overrides):
    values = dict(out=None, max_steps=100_000, log_every=1, eval_every=5, cache_dir=str(tmp_path / "cache"))
    values.update(overrides)
    return quick_config(tmp_path, stories_file(tmp_path), **values)


def test_a_job_runs_in_the_background_is_polled_stopped_and_resumed(tmp_path: Path, new_manager) -> None:
    runs = tmp_path / "runs"
    manager = new_manager(runs)
    assert manager.status().state == "idle" and manager.stop() is False and manager.metrics() == []

    run_dir = manager.start(long_config(tmp_path))
    assert run_dir.parent == runs.resolve() and (run_dir / "run.json").is_file()
    assert manager.status().state in ("preparing", "running")
    status = wait_for(manager, lambda s: s.state == "running" and s.step >= 6 and s.sample is not None)
    assert status.max_steps == 100_000 and status.tokens == status.step * 4 * 32
    assert status.train_loss is not None and status.val_loss is not None and status.tokens_per_s > 0
    assert status.device.startswith("CPU") and status.mfu is None and status.eta_s > 0
    # the newest sample: written at an evaluation (every 5 steps), which a slow poll may see late
    assert status.sample.startswith("Once upon a time") and status.sample_step % 5 == 0
    assert 5 <= status.sample_step <= status.step
    assert str(run_dir) == status.run_dir

    with pytest.raises(TrainingBusyError, match="already in progress"):
        manager.start(long_config(tmp_path))
    with pytest.raises(TrainingBusyError):
        manager.resume(run_dir)
    reattached = new_manager(runs)  # e.g. the server restarted while the job kept running
    assert reattached.status().state == "running" and reattached.status().run_dir == str(run_dir)

    assert manager.stop() is True
    assert manager.status().state == "stopping"
    final = manager.wait(timeout=120)
    assert final.state == "stopped" and "resume" in final.message
    stopped_at = final.step
    assert json.loads((run_dir / "latest" / "training_state.json").read_text())["step"] == stopped_at
    last = manager.metrics()[-1]
    assert last["kind"] == "end" and last["reason"] == "stopped"
    assert reattached.status().state == "stopped"  # read from the run folder alone

    manager.resume(run_dir, max_steps=stopped_at + 2)
    done = manager.wait(timeout=120)
    assert done.state == "finished", done.message
    assert done.step == stopped_at + 2 and done.max_steps == stopped_at + 2 and done.eta_s is None
    steps = [r["step"] for r in manager.metrics() if r["kind"] == "train"]
    assert steps == list(range(1, stopped_at + 3))
    load_model(run_dir / "latest")
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"  # drawn by the worker at each save


def test_a_run_that_fails_is_reported_with_its_error_and_no_traceback(tmp_path: Path, new_manager) -> None:
    manager = new_manager(tmp_path / "runs")
    config = long_config(tmp_path, max_steps=3)
    config.data = str(tmp_path / "missing.txt")
    manager.start(config)
    status = manager.wait(timeout=120)
    assert status.state == "failed"
    assert "missing.txt" in status.message and "does not exist" in status.message
    assert "Traceback" not in status.message and "\n" not in status.message


def test_a_killed_worker_is_reported_as_failed_and_a_new_job_can_start(tmp_path: Path, new_manager) -> None:
    manager = new_manager(tmp_path / "runs")
    run_dir = manager.start(long_config(tmp_path))
    wait_for(manager, lambda s: s.state == "running" and s.step >= 1)
    pid = json.loads((run_dir / "job.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    status = manager.wait(timeout=60)
    assert status.state == "failed" and "SIGKILL" in status.message

    second = manager.start(long_config(tmp_path, max_steps=2))  # the manager is free again
    assert second != run_dir
    assert manager.stop() is True  # at once: the worker is still starting up
    final = manager.wait(timeout=120)
    assert final.state == "stopped", final.message


def test_status_moves_between_log_steps_through_the_heartbeat(tmp_path: Path, new_manager) -> None:
    manager = new_manager(tmp_path / "runs")
    manager.start(long_config(tmp_path, log_every=100_000, eval_every=100_000))
    # only the first step is ever logged, yet the status keeps moving (progress.json, about once a second)
    status = wait_for(manager, lambda s: s.state == "running" and s.step >= 3)
    assert [r["step"] for r in manager.metrics() if r["kind"] == "train"] == [1]
    assert status.tokens == status.step * 4 * 32 and status.train_loss is not None and status.elapsed_s > 0
    manager.stop()
    assert manager.wait(timeout=120).state == "stopped"


def test_a_start_that_fails_leaves_no_run_folder(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    manager = TrainingManager(runs, python=str(tmp_path / "no-such-python"))
    with pytest.raises(OSError):
        manager.start(long_config(tmp_path))
    assert not runs.exists() or list(runs.iterdir()) == []
