"""Training in the background, for the playground: one job at a time, in its own process.

The job runs `python -m slm.jobs RUN_DIR` (this module's `main`), which trains the config stored in
`RUN_DIR/run.json`. A separate process means a crash, an out-of-memory kill or a hang in training
never takes the web server down, closing a browser tab does not stop it, and the server's threads
do not share a GIL with the training loop. Everything the UI shows is read back from the run
folder (`metrics.jsonl`) and the process state, so a page reload simply polls again, and a
manager created after a server restart re-attaches to a job that is still running.

Stopping sends SIGTERM, which the training loop turns into "finish the step, save, exit".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, recover_directory
from .paths import open_append_nofollow, write_text_nofollow
from .train_config import RUN_CONFIG_FILE, TrainConfig, check_run_paths, load_run_config, resume_config
from .training import METRICS_FILE, PROGRESS_FILE

JOB_FILE = "job.json"
LOG_FILE = "worker.log"
LOG_TAIL_BYTES = 16_384


class TrainingBusyError(RuntimeError):
    """A training job is already running in this manager."""


@dataclass
class JobStatus:
    state: str  # "idle" | "preparing" | "running" | "stopping" | "finished" | "stopped" | "failed"
    run_dir: str | None
    step: int
    max_steps: int | None  # None: a time budget alone limits the run
    tokens: int
    train_loss: float | None
    val_loss: float | None
    tokens_per_s: float | None
    mfu: float | None
    elapsed_s: float
    eta_s: float | None
    device: str | None
    message: str  # human-readable; the error text when failed (never a traceback dump)
    sample: str | None
    sample_step: int | None

    @property
    def active(self) -> bool:
        return self.state in ("preparing", "running", "stopping")


def _of(max_steps: int | None) -> str:
    return f"/{max_steps}" if max_steps else ""


class MetricsTail:
    """Reads a growing metrics.jsonl incrementally (complete lines only); notices when it was rewritten."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._identity: tuple[int, int] | None = None

    def refresh(self) -> list[dict[str, Any]]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self.records, self._offset, self._identity = [], 0, None
            return self.records
        identity = (stat.st_ino, stat.st_dev)
        if identity != self._identity or stat.st_size < self._offset:  # replaced by a resume: start over
            self.records, self._offset, self._identity = [], 0, identity
        if stat.st_size == self._offset:
            return self.records
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._offset += end
        return self.records


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    """The training loop's heartbeat (progress.json), or None when absent or unreadable."""
    try:
        record = json.loads((run_dir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _pid_alive(pid: int, run_dir: Path) -> bool:
    """True when `pid` runs and (where /proc shows it) is a training worker of `run_dir`."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return str(run_dir) in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    return True


def _log_tail(path: Path) -> list[str]:
    """The last lines of a worker log, progress-bar redraws (carriage returns) removed."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
    return [line for line in lines if line]


def crash_message(returncode: int | None, log_path: Path) -> str:
    """One readable line (or three) saying why the worker died, from its exit code and log."""
    lines = _log_tail(log_path)
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else -returncode
        head = f"the training process was killed by {name}"
        if returncode == -signal.SIGKILL:
            head += " (out of memory?)"
    elif returncode is None:  # a job adopted from an earlier server: its exit code is unknown
        head = "the training process ended without a final record"
    else:
        head = f"the training process exited with code {returncode}"
    traceback = any(line.startswith("Traceback") for line in lines)
    detail = lines[-1] if traceback else " | ".join(lines[-3:])  # a traceback: only its exception line
    return f"{head}: {detail} (log: {log_path})" if detail else f"{head} (log: {log_path})"


class TrainingManager:
    """Starts, watches and stops one background training job at a time.

    Thread-safe: a Gradio server calls it from many request threads.
    """

    def __init__(self, runs_root: Path, python: str | None = None, allowed_roots: list[Path] | None = None) -> None:
        self.runs_root = Path(runs_root)
        self.python = python or sys.executable
        # Where a job may read data and write anything: None (a library user, like train.py: anywhere), or the
        # runs folder plus the folders given here or to `allow` (the app: its data folder).
        self.allowed_roots: list[Path] | None = None
        self._lock = threading.RLock()
        self._process: subprocess.Popen | None = None
        self._pid: int | None = None
        self._run_dir: Path | None = None
        self._launched_at = 0.0
        self._stop_requested = False
        self._tail: MetricsTail | None = None
        self._planned_steps = 0
        if allowed_roots is not None:
            self.allow(allowed_roots)
        self._adopt_running_job()

    def allow(self, roots: list[Path]) -> None:
        """Let jobs also read and write under `roots` (the app's data folder)."""
        with self._lock:
            if self.allowed_roots is None:
                self.allowed_roots = [self.runs_root.resolve()]
            for root in roots:
                resolved = Path(root).resolve()
                if resolved not in self.allowed_roots:
                    self.allowed_roots.append(resolved)

    # ----- launching -----
    def start(self, config: TrainConfig) -> Path:
        """Start a fresh run in the background and return its folder. TrainingBusyError if one runs."""
        with self._lock:
            self._refuse_if_busy()
            run_dir = self._new_run_dir(config)
            config = TrainConfig.from_dict({**config.to_dict(), "out": str(run_dir), "resume": False})
            if self.allowed_roots is not None:
                check_run_paths(config, run_dir, self.allowed_roots)
            run_dir.mkdir(parents=True, exist_ok=False)
            try:
                config.save(run_dir / RUN_CONFIG_FILE)
                self._launch(run_dir, config)
            except BaseException:  # a start that failed leaves no empty run folder behind
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            return run_dir

    def resume(self, run_dir: Path, max_steps: int | None = None) -> Path:
        """Continue a stopped (or finished, with a larger `max_steps`) run in the background."""
        with self._lock:
            self._refuse_if_busy()
            run_dir = Path(run_dir).resolve()
            config = resume_config(run_dir, max_steps=max_steps)
            if self.allowed_roots is not None:
                check_run_paths(config, run_dir, self.allowed_roots)
            recover_directory(run_dir / "latest")
            if not (run_dir / "latest" / "training_state.json").is_file():
                raise FileNotFoundError(f"nothing to resume in {run_dir}: it has no saved training state")
            config.save(run_dir / RUN_CONFIG_FILE)
            self._launch(run_dir, config)
            return run_dir

    def _refuse_if_busy(self) -> None:
        if self._alive():
            status = self._status_locked()
            raise TrainingBusyError(
                f"a training run is already in progress ({status.run_dir}, step {status.step}{_of(status.max_steps)}); "
                "stop it before starting another"
            )

    def _new_run_dir(self, config: TrainConfig) -> Path:
        if config.out:
            out = Path(config.out).expanduser()
            run_dir = out if out.is_absolute() else self.runs_root / out
            if run_dir.exists() and any(run_dir.iterdir()):
                raise FileExistsError(f"{run_dir} already exists; choose another name or resume it")
            return run_dir.resolve()
        stem = f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir, n = self.runs_root / stem, 2
        while run_dir.exists():
            run_dir, n = self.runs_root / f"{stem}-{n}", n + 1
        return run_dir.resolve()

    def _launch(self, run_dir: Path, config: TrainConfig) -> None:
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        command = [self.python, "-m", "slm.jobs", str(run_dir)]
        for root in self.allowed_roots or []:
            command += ["--allow", str(root)]
        self._launched_at = time.time()
        with open_append_nofollow(run_dir / LOG_FILE, binary=True) as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # Ctrl-C in the server's terminal is not meant for the job
            )
        self._pid = self._process.pid
        self._run_dir = run_dir
        self._stop_requested = False
        self._tail = MetricsTail(run_dir / METRICS_FILE)
        self._planned_steps = config.max_steps or 0
        job = {"pid": self._pid, "launched_at": self._launched_at, "command": command}
        write_text_nofollow(run_dir / JOB_FILE, json.dumps(job, indent=2) + "\n")

    def _adopt_running_job(self) -> None:
        """Re-attach to a worker that a previous manager (an earlier server process) started."""
        if not self.runs_root.is_dir():
            return
        for job_file in sorted(self.runs_root.glob(f"*/{JOB_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True):
            if job_file.is_symlink():  # the app writes job.json itself, as a real file
                continue
            try:
                job = json.loads(job_file.read_text())
                pid, launched_at = int(job["pid"]), float(job["launched_at"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            run_dir = job_file.parent.resolve()
            if _pid_alive(pid, run_dir):
                self._pid, self._run_dir, self._launched_at = pid, run_dir, launched_at
                self._tail = MetricsTail(run_dir / METRICS_FILE)
                return

    # ----- controlling -----
    def _alive(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        if self._pid is not None and self._run_dir is not None:
            return _pid_alive(self._pid, self._run_dir)
        return False

    def _returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def stop(self) -> bool:
        """Ask the running job to finish its step, save and exit. Returns at once; False if none runs."""
        with self._lock:
            if not self._alive() or self._pid is None:
                return False
            self._stop_requested = True
            try:
                os.kill(self._pid, signal.SIGTERM)
            except ProcessLookupError:
                return False
            return True

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job ends (or `timeout` seconds pass) and return its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._alive():
                    break
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return self.status()

    # ----- watching -----
    def metrics(self) -> list[dict[str, Any]]:
        """The metrics.jsonl records of the current (or last) run, oldest first."""
        with self._lock:
            return list(self._tail.refresh()) if self._tail is not None else []

    def status(self) -> JobStatus:
        with self._lock:
            return self._status_locked()

    def _status_locked(self) -> JobStatus:
        if self._run_dir is None or self._tail is None:
            return JobStatus("idle", None, 0, 0, 0, None, None, None, None, 0.0, None, None,
                             "no training run yet", None, None)
        alive = self._alive()
        records = self._tail.refresh()
        s = JobStatus("preparing", str(self._run_dir), 0, self._planned_steps, 0, None, None, None, None, 0.0,
                      None, None, "", None, None)
        started = ended = error = None
        for record in records:
            kind = record.get("kind")
            session = record.get("time", 0) >= self._launched_at - 1.0
            if kind == "start":
                s.step, s.tokens = record["step"], record["tokens"]
                s.max_steps, s.device = record["max_steps"], record.get("device")
                started = record if session else started
            elif kind == "train":
                s.step, s.tokens, s.train_loss = record["step"], record["tokens"], record["train_loss"]
                s.val_loss = record["val_loss"] if record.get("val_loss") is not None else s.val_loss
                s.tokens_per_s, s.mfu = record.get("tokens_per_s"), record.get("mfu")
                s.elapsed_s, s.eta_s = record.get("elapsed_s", 0.0), record.get("eta_s")
            elif kind == "sample":
                s.sample, s.sample_step = record.get("text"), record.get("step")
            elif kind == "end":
                s.step, s.tokens, s.elapsed_s = record["step"], record["tokens"], record.get("elapsed_s", s.elapsed_s)
                ended = record if session else ended
            elif kind == "error" and session:
                error = record
        progress = read_progress(self._run_dir)
        if progress is not None and progress.get("time", 0) >= self._launched_at - 1.0 and progress["step"] > s.step:
            # between two metrics records: the heartbeat's step, tokens, time and running loss
            s.step, s.tokens = progress["step"], progress.get("tokens", s.tokens)
            s.elapsed_s = progress.get("elapsed_s", s.elapsed_s)
            s.train_loss = progress.get("train_loss", s.train_loss)
        if alive:
            if self._stop_requested:
                s.state, s.message = "stopping", "stopping: finishing the current step and saving"
            elif started is None:
                s.state, s.message = "preparing", "preparing the data and the model"
            else:
                s.state = "running"
                loss = f", loss {s.train_loss:.3f}" if s.train_loss is not None else ""
                s.message = f"training: step {s.step}{_of(s.max_steps)}{loss}"
            return s
        s.eta_s = None
        if ended is not None:
            s.state = ended.get("reason", "finished")
            if s.state == "stopped":
                s.message = f"stopped at step {s.step}{_of(s.max_steps)}; the checkpoint is saved, resume to continue"
            else:
                s.message = f"finished {s.step} steps; checkpoint in {self._run_dir / 'latest'}"
        elif error is not None:
            s.state, s.message = "failed", str(error.get("message", "training failed"))
        elif self._stop_requested:
            s.state, s.message = "stopped", "stopped before training began"
        else:
            s.state, s.message = "failed", crash_message(self._returncode(), self._run_dir / LOG_FILE)
        return s


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: train the config in RUN_DIR/run.json (resuming when it says so)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m slm.jobs")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--allow", action="append", type=Path, default=[],
                        help="a folder the job may read data from and write into (repeatable)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from .plots import write_run_loss_plot
    from .training import read_metrics, train

    run_dir = args.run_dir.resolve()
    try:  # run.json is input like any file on disk: it may not lead the job outside its folders
        config = load_run_config(run_dir)
        if args.allow:
            check_run_paths(config, run_dir, args.allow)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    def draw_loss_plot(folder: Path) -> None:
        plot = folder / "loss.png"
        if plot.is_symlink():  # the job writes only real files of its own
            plot.unlink()
        write_run_loss_plot(folder, read_metrics(folder))

    try:
        result = train(config, progress=False, on_save=draw_loss_plot)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as exc:  # said in metrics.jsonl too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}; checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
