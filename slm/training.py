"""The training loop: accumulation, mixed precision, evaluation, metrics, checkpoints, resume,
graceful stop and DDP. The run's settings are in `train_config`, the optimizers and schedule in
`optim`, devices and torchrun in `devices`.

    from slm.train_config import TrainConfig
    from slm.training import train
    result = train(TrainConfig(preset="tiny", data="stories.txt", max_steps=300, out="checkpoints/run"))

A run folder holds `run.json` (the TrainConfig, every default resolved), `metrics.jsonl` (one JSON
record per line: `kind` is "preparing", "start", "train", "sample", "end" or "error"), `latest/`
(a checkpoint plus `training_state.safetensors` / `training_state.json`: optimizer moments, RNG and
sampler states, counters) and `best/` (the weights with the best validation loss); train.py and the
background jobs also draw `loss.png` there at every save.

Resuming restores every piece of state that decides the next step, so a run stopped and resumed
produces exactly the losses of an uninterrupted one (bitwise on CPU). Under `torchrun` the same
entry point trains with DistributedDataParallel; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from .checkpoint import (
    TRAINING_STATE_FORMAT,
    CheckpointError,
    atomic_directory,
    read_config,
    read_safetensors,
    read_training_state,
    recover_directory,
    save_checkpoint,
    write_json,
    write_model_files,
)
from .config import count_parameters
from .data import BatchSampler, eval_window_starts, gather_windows, prepare_data
from .devices import Distributed, autocast_dtype, describe_device, distributed_from_env, resolve_device
from .embedding_init import init_embedding_from_text
from .engine import generate
from .flops import device_peak_flops, mfu, training_flops_per_token
from .loading import LoadedModel, load
from .losses import TrainingVocabulary
from .metrics import bpb_from_mean_loss
from .model import Gemma3LM, build_model
from .optim import (
    build_optimizers,
    lr_factor,
    optimizer_state_from_files,
    optimizer_state_to_files,
    set_adamw_betas,
    set_lr,
    step_progress,
    warmup_factor,
)
from .paths import open_append_nofollow, write_text_nofollow
from .snapshots import keep_snapshot
from .tokenizer import load_tokenizer
from .train_config import RUN_CONFIG_FILE, WARMUP_SHARE, TrainConfig, resolve_config
from .unlikelihood import MAX_SEQUENCES, continuation_lengths, repeated_ngram_mask

METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"  # the heartbeat: rewritten at most every HEARTBEAT_SECONDS
HEARTBEAT_SECONDS = 1.0
EVALUATION_SHARE = 0.05  # time-boxed runs: the most of the budget that evaluations, samples and saves may take
STOP_FILE = "STOP"
LATEST_DIR = "latest"
BEST_DIR = "best"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"
STATE_FORMAT = TRAINING_STATE_FORMAT
SAMPLE_PROMPT = "Once upon a time"
# continued at every evaluation, greedily and sampled with the run's seed, into samples.jsonl
SAMPLE_PROMPTS = (SAMPLE_PROMPT, "Tom and his mom")
SAMPLES_FILE = "samples.jsonl"


class LossModule(nn.Module):
    """Routes `forward` to `model.loss`, so DDP's hooks and torch.compile see the loss computation."""

    def __init__(self, model: Gemma3LM, vocabulary: TrainingVocabulary | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocabulary = vocabulary
        self.dropout = self.embedding_dropout = 0.0  # the trainer sets them before each step

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, unlikely: torch.Tensor | None = None,
                start: int = 0) -> torch.Tensor:
        """The training loss; with an `unlikely` mask, the unlikelihood term over the marked targets instead."""
        if unlikely is not None:
            return self.model.unlikelihood_loss(inputs, targets, unlikely, start)
        return self.model.loss(inputs, targets, vocabulary=self.vocabulary, dropout=self.dropout,
                               embedding_dropout=self.embedding_dropout)


# ----- metrics -------------------------------------------------------------------------------------
def read_metrics(run_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """Every complete record of a run's metrics.jsonl, or of another of its JSON-lines files such as
    samples.jsonl (a half-written last line is skipped)."""
    path = Path(run_dir) / name
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after `step` (by a run that crashed after its last save)."""
    if path.is_symlink():  # not a file this run wrote: never read or write through it
        path.unlink()
        return
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _record_step(line) <= step]
    write_text_nofollow(path, "".join(line + "\n" for line in kept))


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf  # drop damaged lines


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    max_steps: int | None  # None: a time budget alone limits the run
    tokens: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    stopped: bool  # True when a stop request ended the run before max_steps
    elapsed_s: float
    tokens_per_s: float | None  # mean training throughput of this session (evaluations excluded)
    checkpoint: Path | None  # None when stopped before anything was trained
    train_bpb: float | None = None  # bits per UTF-8 byte of the text (None when the tokenizer cannot count bytes)
    val_bpb: float | None = None
    max_time: float | None = None  # the run's time budget in seconds, if it had one


class StopSignals:
    """Turns SIGINT / SIGTERM into a stop request (finish the step, save, exit); a second SIGINT aborts."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nstop requested: finishing the current step and saving (Ctrl-C again to abort)", flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


# ----- the loop ------------------------------------------------------------------------------------
class Trainer:
    """One training run. `train()` is the entry point; this class keeps its pieces in one place."""

    def __init__(
        self,
        config: TrainConfig,
        dist_info: Distributed,
        on_metrics: Callable[[dict[str, Any]], None] | None,
        stop_event: threading.Event | None,
        progress: bool,
        signals: StopSignals,
        on_save: Callable[[Path], None] | None = None,
    ) -> None:
        self.dist = dist_info
        self.on_save = on_save
        # Control messages (config, rank 0's data preparation, stop requests) go over CPU gloo with a
        # long timeout: a first run's data preparation can outlast NCCL's 10-minute watchdog.
        self.control_group = (
            dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6)) if dist_info.enabled else None
        )
        self.device = resolve_device(config.device, dist_info.local_rank)
        self.config = self._agreed(resolve_config(config, self.device, dist_info.world_size))
        self.run_dir = Path(self.config.out)
        self.on_metrics = on_metrics
        self.stop_event = stop_event
        self.progress = progress and dist_info.is_main
        self.signals = signals
        self.metrics_path = self.run_dir / METRICS_FILE
        self.amp_dtype = autocast_dtype(self.config.dtype, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        # counters that a resume restores
        self.step = 0
        self.start_step = 0
        self.elapsed_before = 0.0  # seconds trained by earlier sessions of this run
        self.session_start = self.interval_start = time.perf_counter()
        self.tokens_per_s: float | None = None  # of the last logged interval
        self.session_train_seconds = 0.0  # time in training steps (evaluations excluded) in this session
        self.session_train_tokens = 0
        self.bar: Any = None
        self.embedding_init_s: float | None = None  # seconds spent placing the embedding (a fresh run's)
        self.folder_ready = False
        self.best_val_loss: float | None = None
        self.best_pending = False  # the last evaluation improved on the best; best/ is saved after latest/
        self.last_val_loss: float | None = None
        self.last_train_loss: float | None = None
        self.interval_loss = torch.zeros((), device=self.device)
        self.interval_steps = 0
        self.interval_bytes = torch.zeros((), dtype=torch.int64, device=self.device)  # UTF-8 bytes of its targets
        self.interval_unlikelihood = torch.zeros((), device=self.device)  # the sum of the interval's terms
        self.interval_unlikelihood_steps = 0
        self.last_val_bpb: float | None = None
        self.last_train_bpb: float | None = None
        self.lr = config.lr  # of the blocks' matrices at the last step (the embedding's is embedding_lr / lr times it)
        self.step_seconds = 0.0  # a running mean of a training step's seconds, for the time budget
        self.last_by_time = False  # the step now running is the last one the time budget allows
        # the share of the time budget done at the end of the step now running, agreed by every rank: the
        # learning rate and the unlikelihood term must not follow each rank's own clock
        self.time_share = 0.0
        self.next_eval_s = math.inf  # when a time-boxed run without eval_every evaluates next

    # -- set-up --
    def _agreed(self, config: TrainConfig) -> TrainConfig:
        """Every rank uses rank 0's resolved config (its run folder name has rank 0's timestamp)."""
        if not self.dist.enabled:
            return config
        box = [config.to_dict()]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return TrainConfig.from_dict(box[0])

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 and hand its result (or its error) to every rank."""
        result, error = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except Exception as exc:
                error = exc
        if self.dist.enabled:
            box = [None if error is None else f"{type(error).__name__}: {error}"]
            dist.broadcast_object_list(box, src=0, group=self.control_group)  # ranks wait here, on the CPU
            if box[0] is not None and error is None:
                raise RuntimeError(f"rank 0 failed: {box[0]}")
        if error is not None:
            raise error
        return result

    def prepare_run_folder(self) -> None:
        c = self.config
        latest = self.run_dir / LATEST_DIR
        recover_directory(latest)  # a save that a crash interrupted is finished or rolled back first
        if c.resume:
            if not (latest / STATE_JSON_FILE).is_file():
                raise FileNotFoundError(
                    f"nothing to resume in {self.run_dir}: it has no {LATEST_DIR}/{STATE_JSON_FILE}"
                )
        elif latest.exists() or self.metrics_path.exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a run; resume it (--resume) or choose another --out"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        c.save(self.run_dir / RUN_CONFIG_FILE)
        if c.resume:
            saved_step = self._saved_step()
            _truncate_metrics(self.metrics_path, saved_step)
            _truncate_metrics(self.run_dir / SAMPLES_FILE, saved_step)
        self.folder_ready = True
        self.emit({"kind": "preparing", "step": self._saved_step(), "time": time.time()})

    def _saved_step(self) -> int:
        path = self.run_dir / LATEST_DIR / STATE_JSON_FILE
        return read_training_state(path)["step"] if self.config.resume and path.is_file() else 0

    def build(self) -> None:
        c = self.config
        imported = self._imported_model()
        tokenizer = imported.tokenizer if imported is not None else load_tokenizer()
        self.tokenizer = tokenizer
        spec = c.data_spec()
        stop = self.stop_requested_locally
        self._on_main(lambda: prepare_data(spec, tokenizer, c.cache_dir, progress=self.progress, should_stop=stop))
        data = prepare_data(spec, tokenizer, c.cache_dir, progress=False)  # every rank opens the cache
        self.data_meta = data.meta
        self.sampler = BatchSampler(
            data.train, c.batch_size, c.context_length, c.seed, self.dist.rank, self.dist.world_size, self.device
        )
        self.val_tokens = data.val
        # eval_batches global batches, dealt out to the ranks: the same windows for any number of ranks
        self.eval_starts = eval_window_starts(
            data.val, c.batch_size, c.context_length, c.eval_batches * self.dist.world_size
        )
        self.eval_length = min(c.context_length, data.val.size - 1)
        self.setup_bits_per_byte()

        if imported is not None:
            self.model_config = imported.model.config
            self.model = imported.model.to(self.device, torch.float32)
        else:
            # a resumed run goes on with the model it saved, also where its preset has changed since
            self.model_config = read_config(self.run_dir / LATEST_DIR) if c.resume else c.model_config()
            self.model = build_model(self.model_config, device=self.device, seed=c.seed)
            if not c.resume and c.embedding_init == "cooccurrence":
                started = time.perf_counter()
                init_embedding_from_text(self.model.embed_tokens.weight, data.train, self.model_config.init_std,
                                         seed=c.seed)
                self.embedding_init_s = time.perf_counter() - started
        vocabulary = None if imported is not None else TrainingVocabulary.of_tokens(
            data.train, self.model_config.vocab_size)
        if vocabulary is not None and not c.resume:
            vocabulary.share_unused_rows(self.model.head_weight)
        self.model.train()
        self.optimizers = build_optimizers(self.model, c, self.device)
        if c.resume:
            self.load_state()
        # the loss over the whole vocabulary at the cost of the text's ids, where the weights allow it
        # (an imported model's rows differ, and so do those of runs from before the shortcut)
        if vocabulary is not None and not vocabulary.rows_are_shared(self.model.head_weight):
            vocabulary = None
        self.vocabulary = vocabulary.to(self.device) if vocabulary is not None else None
        self.training_loss = LossModule(self.model, self.vocabulary)
        self.epoch = self.sampler.epoch  # the pass over the training text that the last batch came from
        loss_module: nn.Module = self.training_loss
        # evaluation scores every id: held-out text may hold ids the training text lacks
        eval_module = LossModule(self.model)
        plain = torch.compile(loss_module) if c.compile else loss_module
        if self.dist.enabled:
            # DDP first, then compile: the compiled graph is split at DDP's buckets so that gradient
            # all-reduce overlaps the backward. Buffers (rotary tables) are constants: no broadcast.
            ids = [self.device.index] if self.device.type == "cuda" else None
            loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=ids, broadcast_buffers=False)
            loss_module = torch.compile(loss_module) if c.compile else loss_module
        else:
            loss_module = plain
        # evaluation needs no DDP: ranks score different windows
        self.eval_loss_module = torch.compile(eval_module) if c.compile else eval_module
        self.loss_module = loss_module
        self.tokens_per_step = c.batch_size * c.grad_accum * c.context_length * self.dist.world_size
        self.flops_per_token = training_flops_per_token(self.model_config, self.sampler.length)
        self.peak_flops = device_peak_flops(self.device) if self.amp_dtype is not None else None

    def setup_bits_per_byte(self) -> None:
        """Per-token UTF-8 byte counts (from the tokenizer) and the bytes of the fixed validation windows'
        targets: bits per byte = nats / ln 2 / bytes, comparable across tokenizers."""
        lengths = getattr(self.tokenizer, "token_byte_lengths", None)
        self.byte_lengths = lengths().to(self.device) if lengths is not None else None
        self.eval_tokens = self.eval_bytes = 0
        if self.byte_lengths is None:
            return
        for starts in self.eval_starts:
            _, targets = gather_windows(self.val_tokens, starts, self.eval_length, "cpu")
            self.eval_tokens += targets.numel()
            self.eval_bytes += int(self.byte_lengths.cpu()[targets].sum())

    def bpb(self, mean_loss: float, tokens: int, total_bytes: int) -> float | None:
        return bpb_from_mean_loss(mean_loss, tokens, total_bytes) if total_bytes > 0 else None

    def _imported_model(self) -> LoadedModel | None:
        """With `init_from`: the imported model and its tokenizer (a resumed run reads its own latest
        checkpoint instead, which holds the same architecture and tokenizer files)."""
        c = self.config
        if not c.init_from:
            return None
        imported = load(self.run_dir / LATEST_DIR if c.resume else c.init_from)
        if c.context_length > imported.model.config.context_length:
            raise ValueError(f"--context-length {c.context_length} is longer than the imported model's context "
                             f"({imported.model.config.context_length})")
        return imported

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- state --
    def state_files(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, groups = optimizer_state_to_files(self.optimizers)
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        sampler_state = self.sampler.state_dict()
        scalars = {
            "format": STATE_FORMAT,
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "max_steps": self.config.max_steps,
            "world_size": self.dist.world_size,
            "elapsed_s": self.elapsed(),
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "last_val_bpb": self.last_val_bpb,
            "last_train_loss": self.last_train_loss,
            "interval_loss": float(self.interval_loss.item()),
            "interval_steps": self.interval_steps,
            "interval_bytes": int(self.interval_bytes.item()),
            "interval_unlikelihood": float(self.interval_unlikelihood.item()),
            "interval_unlikelihood_steps": self.interval_unlikelihood_steps,
            "sampler_draws": sampler_state["draws"],
            "optimizer": self.config.optimizer,
            "param_groups": groups,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        return tensors, scalars

    def load_state(self) -> None:
        folder = self.run_dir / LATEST_DIR
        scalars = read_training_state(folder / STATE_JSON_FILE)
        try:
            self._load_state(folder, scalars)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(
                f"the training state in {folder} does not fit this run ({type(exc).__name__}: {exc}); "
                f"it cannot be resumed. Its weights still load for generation; start a new run to keep training."
            ) from None

    def _load_state(self, folder: Path, scalars: dict[str, Any]) -> None:
        if scalars["optimizer"] != self.config.optimizer:
            raise ValueError(f"the run was trained with {scalars['optimizer']}; it cannot resume with "
                             f"{self.config.optimizer}")
        tensors = read_safetensors(folder / STATE_TENSORS_FILE)
        weights = read_safetensors(folder / "model.safetensors")
        if self.model_config.tie_embeddings:
            weights.pop("lm_head.weight", None)
        self.model.load_export_state_dict(weights)
        optimizer_state_from_files(self.optimizers, tensors, scalars["param_groups"])
        torch.set_rng_state(tensors["rng.cpu"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.sampler.load_state_dict({"draws": scalars["sampler_draws"]})
        if self.scaler is not None and scalars.get("scaler"):
            self.scaler.load_state_dict(scalars["scaler"])
        self.step = int(scalars["step"])
        self.elapsed_before = float(scalars["elapsed_s"])
        self.best_val_loss = scalars["best_val_loss"]
        self.last_val_loss = scalars["last_val_loss"]
        self.last_train_loss = scalars["last_train_loss"]
        self.interval_loss = torch.tensor(scalars["interval_loss"], dtype=torch.float32, device=self.device)
        self.interval_steps = int(scalars["interval_steps"])
        self.interval_bytes.fill_(int(scalars.get("interval_bytes", 0)))
        self.interval_unlikelihood.fill_(float(scalars.get("interval_unlikelihood", 0.0)))
        self.interval_unlikelihood_steps = int(scalars.get("interval_unlikelihood_steps", 0))
        self.last_val_bpb = scalars.get("last_val_bpb")

    def metadata(self, val_loss: float | None) -> dict[str, Any]:
        c = self.config
        return {
            "preset": c.preset if not (c.model or c.init_from) else None,
            "init_from": c.init_from,
            "step": self.step,
            "tokens": self.step * self.tokens_per_step,
            "val_loss": val_loss,
            "val_bpb": self.bpb(val_loss, self.eval_tokens, self.eval_bytes) if val_loss is not None else None,
            "train_loss": self.last_train_loss,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run": self.run_dir.name,
            "data": c.data,
            "optimizer": c.optimizer,
        }

    def save_latest(self) -> Path:
        """The resumable checkpoint, written atomically (a crash mid-save keeps the previous one)."""
        folder = self.run_dir / LATEST_DIR
        if not self.dist.is_main:  # every rank holds the same state; rank 0 writes it
            return folder
        tensors, scalars = self.state_files()
        with atomic_directory(folder) as tmp:
            write_model_files(tmp, self.model, self.metadata(self.last_val_loss), self.tokenizer)
            save_file(tensors, str(tmp / STATE_TENSORS_FILE))
            write_json(tmp / STATE_JSON_FILE, scalars)
        if self.on_save is not None:
            self.on_save(self.run_dir)
        return folder

    def keep_snapshot(self, last: bool = False) -> None:
        """Weights at the planned snapshot steps (0, 10, 20, 50, 100, ... and the last): see slm/snapshots.py."""
        if self.dist.is_main:
            keep_snapshot(self.run_dir, self.model, self.step, self.config.max_steps,
                          self.step * self.tokens_per_step, self.metadata(self.last_val_loss), last=last)

    def emit(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open_append_nofollow(self.metrics_path) as f:
            f.write(json.dumps(record) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(record)

    # -- stopping --
    def stop_requested_locally(self) -> bool:
        return (
            self.signals.requested
            or (self.stop_event is not None and self.stop_event.is_set())
            or (self.run_dir / STOP_FILE).exists()
        )

    def stop_requested(self) -> bool:
        return self.agreed_flags(self.stop_requested_locally(), False)[0]

    def agreed_flags(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on any rank is true on all (stop requests, time-budget decisions)."""
        return tuple(value > 0 for value in self.agreed_maxima(*flags))

    def agreed_maxima(self, *values: float) -> tuple[float, ...]:
        """Each value's maximum over the ranks, agreed over a CPU (gloo) group: no GPU synchronisation per step."""
        if not self.dist.enabled:
            return tuple(float(v) for v in values)
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control_group)
        return tuple(tensor.tolist())

    # -- one step, evaluation, sample --
    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the gradient norm (before clipping)."""
        c = self.config
        unlikelihood = self.unlikelihood_is_on()
        for micro in range(c.grad_accum):
            self.epoch = self.sampler.epoch
            self.training_loss.dropout, self.training_loss.embedding_dropout = c.dropout_rates(self.epoch)
            inputs, targets = self.sampler.next_batch()
            if self.byte_lengths is not None:
                self.interval_bytes += self.byte_lengths[targets].sum()
            last = micro == c.grad_accum - 1 and not unlikelihood
            no_sync = self.loss_module.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with no_sync:
                with self.autocast():
                    loss = self.loss_module(inputs, targets)
                scaled = loss / c.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            self.interval_loss += loss.detach().float() / c.grad_accum
        if unlikelihood:
            self.unlikelihood_step(inputs)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.scaler is not None:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else math.inf)
        self.lr = c.lr * self.schedule_factor()
        set_lr(self.optimizers, self.lr / c.lr)
        set_adamw_betas(self.optimizers, c.adamw_betas(self.epoch))
        for optimizer in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        if self.vocabulary is not None:
            self.vocabulary.keep_gradient(self.model.head_weight)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.interval_steps += 1
        return grad_norm

    def unlikelihood_step(self, inputs: torch.Tensor) -> None:
        """Continue the starts of this step's windows greedily and add the unlikelihood of their repeats
        (slm/unlikelihood.py) to the gradients, weighted by `unlikelihood`; the step's last backward."""
        prefix, new = continuation_lengths(inputs.shape[1])
        prefixes = inputs[:MAX_SEQUENCES, :prefix]
        # eager decoding outside autocast (the cache keeps the weights' dtype); the weights change every
        # step, so nothing is compiled for them
        continued = generate(self.model, prefixes, new, temperature=0.0, compiled=False)
        sequences = torch.cat((prefixes, continued), dim=1)
        unlikely = repeated_ngram_mask(sequences, prefix, self.config.unlikelihood_ngram)[:, 1:]
        with self.autocast():
            term = self.loss_module(sequences[:, :-1], sequences[:, 1:], unlikely, prefix - 1)
        scaled = term * self.config.unlikelihood
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.interval_unlikelihood += term.detach().float()
        self.interval_unlikelihood_steps += 1

    # -- schedule and time budget --
    def share_done(self) -> float:
        """The share of the run done after the warmup (0..1) at the end of the step about to run: of its
        steps or, with `max_time`, of its time budget (the step that will use up the budget is at 1)."""
        c = self.config
        if self.last_by_time:
            return 1.0
        progress = step_progress(self.step, c.warmup_steps, c.max_steps) if c.max_steps is not None else 0.0
        return max(progress, self.time_share)

    def local_time_share(self) -> float:
        """This rank's share of the time budget done at the end of a step started now (0 without one)."""
        c = self.config
        return (self.elapsed() + self.step_seconds) / c.max_time if c.max_time is not None else 0.0

    def warming_up(self) -> bool:
        """The step about to run is in the warmup: the first `warmup_steps` steps or, with a time budget
        alone (`warmup_steps` None), the first WARMUP_SHARE of the budget."""
        c = self.config
        return self.step < c.warmup_steps if c.warmup_steps is not None else self.time_share < WARMUP_SHARE

    def schedule_factor(self) -> float:
        """The learning rate of the step about to run, as a fraction of the peak: the warmup (by steps, or
        by time), then the decay by the share of the run done (`share_done`), so that the last step runs at
        exactly min_lr."""
        c = self.config
        if self.warming_up():
            factor = (warmup_factor(self.step, c.warmup_steps) if c.warmup_steps is not None
                      else max(self.time_share, 1e-3) / WARMUP_SHARE)
            # a time budget can end inside the warmup: its last step still ends at min_lr (or below)
            return min(factor, c.min_lr / c.lr) if self.last_by_time else factor
        return lr_factor(self.share_done(), c.min_lr / c.lr, c.schedule, c.decay_fraction)

    def unlikelihood_is_on(self) -> bool:
        """The step about to run is in the last `unlikelihood_share` of the run (and the term is on)."""
        c = self.config
        return c.unlikelihood > 0 and not self.warming_up() and self.share_done() >= 1 - c.unlikelihood_share

    def time_is_up(self) -> bool:
        """The time budget is spent (a resumed run in that state trains no further; a running one has just
        taken its last step, at min_lr, since a step that starts this late is always the last)."""
        c = self.config
        return c.max_time is not None and self.elapsed() >= c.max_time

    def advance_bar(self) -> None:
        if self.config.max_time is None:
            self.bar.update(1)
        else:
            self.bar.n = min(self.elapsed(), self.config.max_time)
            self.bar.refresh()

    def last_step_by_time(self) -> bool:
        """True when a step started now leaves no room in the time budget for another one."""
        c = self.config
        return c.max_time is not None and self.elapsed() + 2 * self.step_seconds >= c.max_time

    def time_to_evaluate(self) -> bool:
        """Time-boxed runs without `eval_every` evaluate when `schedule_next_evaluation` said (so that on a
        slow machine evaluations cannot crowd out the training)."""
        c = self.config
        return c.max_time is not None and c.eval_every is None and self.elapsed() >= self.next_eval_s

    def schedule_next_evaluation(self, cost_s: float) -> None:
        """A time-boxed run evaluates a tenth of its budget after the previous evaluation, or later when
        evaluating (with its samples and save) is slow: evaluations never take more than EVALUATION_SHARE
        of the budget (on the loaded 2-core CPU of bench/QUALITY.md they took up to 40% of a 5-minute run)."""
        self.next_eval_s = self.elapsed() + max(self.config.max_time / 10, cost_s / EVALUATION_SHARE)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (split across ranks, then summed)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i, starts in enumerate(self.eval_starts):
            if i % self.dist.world_size != self.dist.rank:
                continue
            inputs, targets = gather_windows(self.val_tokens, starts, self.eval_length, self.device)
            with self.autocast():
                total += self.eval_loss_module(inputs, targets).float()
        if self.dist.enabled:
            dist.all_reduce(total)
        self.model.train()
        return float(total.item()) / len(self.eval_starts)

    def sample(self, prompt: str = SAMPLE_PROMPT, greedy: bool = False) -> str:
        """The prompt and its continuation: sampled (temperature 0.8, top-k 50, the run's seed) or greedy."""
        new = generate(
            self.model, self.tokenizer.encode(prompt), max_new_tokens=self.config.sample_tokens,
            temperature=0.0 if greedy else 0.8, top_k=None if greedy else 50, seed=self.config.seed,
            stop_token_ids=[self.tokenizer.eot_id],
        )
        self.model.train()
        return prompt + self.tokenizer.decode([t for t in new if t != self.tokenizer.eot_id])

    def write_samples(self) -> str:
        """Continue each of SAMPLE_PROMPTS greedily and sampled, and append them to samples.jsonl with the
        step: the run folder shows how the writing changed as it learned. Returns the first sampled text."""
        records = [
            {"step": self.step, "tokens": self.step * self.tokens_per_step, "prompt": prompt,
             "mode": "greedy" if greedy else "sampled", "text": self.sample(prompt, greedy), "time": time.time()}
            for prompt in SAMPLE_PROMPTS for greedy in (True, False)
        ]
        with open_append_nofollow(self.run_dir / SAMPLES_FILE) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return next(r["text"] for r in records if r["mode"] == "sampled")

    # -- the run --
    _last_heartbeat = 0.0

    def heartbeat(self) -> None:
        """Rewrite progress.json (step, tokens, elapsed, running loss) at most every HEARTBEAT_SECONDS, so a UI
        shows progress between metrics records (ten steps can take a minute on a CPU). Costs one loss read."""
        now = time.perf_counter()
        if not self.dist.is_main or now - self._last_heartbeat < HEARTBEAT_SECONDS:
            return
        self._last_heartbeat = now
        loss = float(self.interval_loss.item()) / self.interval_steps if self.interval_steps else self.last_train_loss
        record = {"step": self.step, "max_steps": self.config.max_steps, "tokens": self.step * self.tokens_per_step,
                  "elapsed_s": self.elapsed(), "train_loss": loss, "time": time.time()}
        write_text_nofollow(self.run_dir / PROGRESS_FILE, json.dumps(record))  # a reader never sees half a file

    def elapsed(self) -> float:
        """Seconds this run has been training, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def eta(self, seconds_per_step: float) -> float:
        """Seconds left: of the time budget, or of the steps at this session's pace (whichever ends first)."""
        c = self.config
        left = [c.max_time - self.elapsed()] if c.max_time is not None else []
        if c.max_steps is not None:
            left.append(seconds_per_step * (c.max_steps - self.step))
        return max(0.0, min(left))

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (gloo has no AVG: sum, then divide)."""
        if self.dist.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value = value / self.dist.world_size
        return float(value.item())

    def log(self, grad_norm: torch.Tensor, evaluate: bool) -> None:
        """Write a metrics record for the steps since the last one (and evaluate when asked)."""
        c = self.config
        train_loss_value = self.mean_over_ranks(self.interval_loss / self.interval_steps)  # synchronises
        seconds = max(time.perf_counter() - self.interval_start, 1e-9)
        self.tokens_per_s = self.interval_steps * self.tokens_per_step / seconds
        self.session_train_seconds += seconds
        self.session_train_tokens += self.interval_steps * self.tokens_per_step
        self.last_train_loss = train_loss_value
        interval_bytes = self.interval_bytes
        if self.dist.enabled:
            interval_bytes = interval_bytes.clone()
            dist.all_reduce(interval_bytes)
        train_bpb = self.bpb(train_loss_value, self.interval_steps * self.tokens_per_step, int(interval_bytes.item()))
        self.last_train_bpb = train_bpb
        self.interval_loss.zero_()
        self.interval_bytes.zero_()
        unlikelihood = None
        if self.interval_unlikelihood_steps:  # every rank ran the term on the same steps
            unlikelihood = self.mean_over_ranks(self.interval_unlikelihood / self.interval_unlikelihood_steps)
        self.interval_unlikelihood.zero_()
        self.interval_unlikelihood_steps = 0
        self.interval_steps = 0
        val_loss = self.evaluate() if evaluate else None
        val_bpb = self.bpb(val_loss, self.eval_tokens, self.eval_bytes) if val_loss is not None else None
        seconds_per_step = (time.perf_counter() - self.session_start) / max(self.step - self.start_step, 1)
        self.emit({
            "kind": "train", "step": self.step, "tokens": self.step * self.tokens_per_step,
            "train_loss": train_loss_value, "val_loss": val_loss, "train_bpb": train_bpb, "val_bpb": val_bpb,
            "val_perplexity": math.exp(min(val_loss, 50.0)) if val_loss is not None else None,
            "lr": self.lr, "grad_norm": float(grad_norm),
            "epoch": self.epoch, "dropout": self.training_loss.dropout,
            "embedding_dropout": self.training_loss.embedding_dropout, "betas": list(c.adamw_betas(self.epoch)),
            "unlikelihood": unlikelihood,
            "tokens_per_s": self.tokens_per_s,
            "mfu": mfu(self.tokens_per_s, self.flops_per_token, self.peak_flops, self.dist.world_size),
            "elapsed_s": self.elapsed(), "eta_s": self.eta(seconds_per_step),
            "time": time.time(),
        })
        if self.bar is not None:
            bpb = {"bpb": f"{train_bpb:.3f}"} if train_bpb is not None else {}
            self.bar.set_postfix(loss=f"{train_loss_value:.3f}", **bpb, tok_s=f"{self.tokens_per_s:,.0f}",
                                 step=self.step, refresh=False)
        if val_loss is None:
            return
        self.last_val_loss, self.last_val_bpb = val_loss, val_bpb
        if self.dist.is_main and c.sample_tokens:
            self.emit({"kind": "sample", "step": self.step, "tokens": self.step * self.tokens_per_step,
                       "prompt": SAMPLE_PROMPT, "text": self.write_samples(), "time": time.time()})
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.best_pending = True  # written right after the next save of latest/: best never runs ahead of it

    def save_best_if_pending(self) -> None:
        if self.best_pending and self.dist.is_main and self.last_val_loss is not None:
            save_checkpoint(self.run_dir / BEST_DIR, self.model, self.metadata(self.last_val_loss), self.tokenizer)
        self.best_pending = False

    def run(self) -> TrainResult:
        c = self.config
        self._on_main(self.prepare_run_folder)
        try:
            self.build()
        except InterruptedError:  # stopped while the data was being prepared: nothing trained, nothing to save
            step = self._saved_step() if self.dist.is_main else 0
            self.emit({"kind": "end", "reason": "stopped", "step": step, "tokens": 0, "checkpoint": None,
                       "elapsed_s": 0.0, "time": time.time()})
            return TrainResult(self.run_dir, step, c.max_steps, 0, None, None, None, True, 0.0, None, None)
        self.start_step = self.step
        self.emit({
            "kind": "start", "step": self.step, "max_steps": c.max_steps, "max_time": c.max_time,
            "tokens": self.step * self.tokens_per_step, "tokens_per_step": self.tokens_per_step,
            "device": describe_device(self.device, self.dist.world_size), "world_size": self.dist.world_size,
            "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
            "parameters": count_parameters(self.model_config).total, "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops, "train_tokens": self.data_meta["train_tokens"],
            "val_tokens": self.data_meta["val_tokens"], "resumed": c.resume, "time": time.time(),
            "vocabulary": self.model_config.vocab_size,
            "trained_columns": self.vocabulary.width if self.vocabulary is not None else self.model_config.vocab_size,
            "embedding_from_text_s": self.embedding_init_s,
        })
        if self.progress:
            from tqdm.auto import tqdm

            if c.max_time is not None:  # a time-boxed run's bar counts seconds
                self.bar = tqdm(total=round(c.max_time), initial=min(round(self.elapsed_before), round(c.max_time)),
                                unit="s", desc="training", dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s [{elapsed}<{remaining}{postfix}]")
            else:
                self.bar = tqdm(total=c.max_steps, initial=self.step, unit="step", desc="training", dynamic_ncols=True)
        self.session_start = self.interval_start = time.perf_counter()
        if c.max_time is not None:
            self.next_eval_s = self.elapsed_before + c.max_time / 10
        stopped = False
        self.keep_snapshot()  # step 0: the initial weights, before any update
        try:
            while c.max_steps is None or self.step < c.max_steps:
                if self.step == self.start_step and self.time_is_up():  # resumed with its budget spent
                    break
                stop, last, self.time_share = self.agreed_maxima(
                    self.stop_requested_locally(), self.last_step_by_time(), self.local_time_share())
                self.last_by_time = last > 0
                if stop > 0:
                    stopped = True
                    break
                started = time.perf_counter()
                grad_norm = self.train_step()
                seconds = time.perf_counter() - started
                self.step_seconds = seconds if self.step_seconds == 0 else 0.7 * self.step_seconds + 0.3 * seconds
                self.heartbeat()
                if self.bar is not None:
                    self.advance_bar()
                final = self.step == c.max_steps or self.last_by_time
                evaluate = (c.eval_every is not None and self.step % c.eval_every == 0) or final
                evaluate = self.agreed_flags(evaluate or self.time_to_evaluate(), False)[0]
                evaluation_started = time.perf_counter()
                if self.step % c.log_every == 0 or self.step == 1 or evaluate:
                    self.log(grad_norm, evaluate)
                save_due = self.step % c.save_every == 0 if c.save_every is not None else evaluate
                if (save_due or self.best_pending) and not final:
                    self.save_latest()
                    self.save_best_if_pending()
                if evaluate and c.max_time is not None:
                    self.schedule_next_evaluation(time.perf_counter() - evaluation_started)
                self.keep_snapshot()
                if final:
                    break
                if self.interval_steps == 0:  # a record was just written: time the next interval from here
                    self.interval_start = time.perf_counter()
        finally:
            if self.bar is not None:
                self.bar.close()
        checkpoint = self.save_latest()
        self.save_best_if_pending()
        self.keep_snapshot(last=True)
        reason = "stopped" if stopped else "finished"
        self.emit({"kind": "end", "reason": reason, "step": self.step, "tokens": self.step * self.tokens_per_step,
                   "checkpoint": str(checkpoint), "elapsed_s": self.elapsed(), "val_loss": self.last_val_loss,
                   "val_bpb": self.last_val_bpb, "time": time.time()})
        if self.dist.is_main:
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        return TrainResult(
            run_dir=self.run_dir, step=self.step, max_steps=c.max_steps, tokens=self.step * self.tokens_per_step,
            train_loss=self.last_train_loss, val_loss=self.last_val_loss, best_val_loss=self.best_val_loss,
            stopped=stopped, elapsed_s=self.elapsed(), checkpoint=checkpoint,
            tokens_per_s=self.session_train_tokens / self.session_train_seconds if self.session_train_seconds else None,
            train_bpb=self.last_train_bpb, val_bpb=self.last_val_bpb, max_time=c.max_time,
        )


def train(
    config: TrainConfig,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    stop_event: threading.Event | None = None,
    progress: bool = False,
    on_save: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train (or resume, with `config.resume`) a model; returns when finished or stopped.

    `on_metrics` receives every record written to metrics.jsonl; `on_save(run_dir)` runs after each
    save of `latest/` (train.py draws `loss.png` there). A stop request (`stop_event`, a `STOP` file
    in the run folder, SIGINT or SIGTERM) finishes the current step, saves and returns. Under torchrun
    (WORLD_SIZE > 1) this joins the process group and trains with DDP; rank 0 alone writes.
    """
    dist_info = distributed_from_env()
    own_group = dist_info.enabled and not dist.is_initialized()
    if own_group:
        want_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
        if want_cuda:
            torch.cuda.set_device(dist_info.local_rank)
        dist.init_process_group("nccl" if want_cuda else "gloo")
    signals = StopSignals(announce=dist_info.is_main)
    trainer = None
    try:
        with signals.installed():
            trainer = Trainer(config, dist_info, on_metrics, stop_event, progress, signals, on_save)
            if trainer.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            return trainer.run()
    except Exception as exc:
        if trainer is not None and trainer.folder_ready:
            with contextlib.suppress(OSError):
                trainer.emit({"kind": "error", "step": trainer.step, "message": error_message(exc),
                              "time": time.time()})
        raise
    finally:
        if own_group:
            dist.destroy_process_group()


def error_message(exc: BaseException) -> str:
    """One line for a user: the message alone for errors we raise on purpose, with the type otherwise."""
    from .data import DataError

    if isinstance(exc, (DataError, FileNotFoundError, FileExistsError, ValueError, CheckpointError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
