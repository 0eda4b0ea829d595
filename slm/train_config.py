"""TrainConfig: everything that decides a training run, stored as `run.json` in its run folder."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, ModelConfig, preset
from .data import DEFAULT_DATASET, DataSpec, local_files
from .paths import PathNotAllowed, inside, write_text_nofollow

RUN_CONFIG_FILE = "run.json"
# Fields added after runs were first recorded, with the value that a run recorded without them ran
# with, so that resuming it continues the same run rather than taking today's default.
VALUES_OF_OLDER_RECORDS: dict[str, Any] = {
    "dropout": 0.0, "embedding_dropout": 0.0, "muon_momentum": 0.95, "late_betas_from_pass": 0,
    "dropout_from_pass": 2, "embedding_init": "normal", "unlikelihood": 0.0, "unlikelihood_ngram": 4,
}
DEFAULT_MAX_STEPS = 2000
CPU_BATCH_SIZE = 4  # sequences per step when no batch size is given: small batches learn most per CPU token
GPU_BATCH_SIZE = 32
TINYSTORIES_TOKENS = 470_000_000  # one epoch of TinyStories' train split with the GPT-2 tokenizer (approx.)
# On a GPU, with no batch size and no length given: a full TinyStories epoch at ~32k tokens per step
# (README "GPU recipes" has the arithmetic and the predicted H100 times).
GPU_RECIPES: dict[str, dict[str, int]] = {
    "tiny": {"batch_size": 64, "max_tokens": TINYSTORIES_TOKENS},
    "small": {"batch_size": 64, "max_tokens": TINYSTORIES_TOKENS},
    "gemma3-270m": {"batch_size": 32, "max_tokens": TINYSTORIES_TOKENS},
}
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("wsd", "cosine")
EMBEDDING_INITS = ("cooccurrence", "normal")
WARMUP_SHARE = 0.05  # a run warms up over its first 5%: of its steps or, with a time budget alone, of its time
INIT_FROM_CONTEXT = 512  # training windows of an imported model (Gemma 3's own context is 32k)
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_TRAIN_CONTEXT = 32_768  # Gemma 3 270M's own context; trained sequences longer than this are refused
# Upper bounds on what a flag, the Train tab or a run.json may ask for: far above real runs, far below
# what would exhaust a machine before a clear message could be given.
MAX_VALUES = {
    "context_length": MAX_TRAIN_CONTEXT, "batch_size": 65_536, "grad_accum": 65_536,
    "max_steps": 1_000_000_000, "max_tokens": 10**15, "eval_batches": 100_000, "max_stories": 10**10,
    "log_every": 1_000_000_000, "eval_every": 1_000_000_000, "save_every": 1_000_000_000,
}
MAX_TOKENS_PER_MICRO_STEP = 2**20  # batch_size x context_length: 1M tokens (32 x 1024 is a usual GPU batch)


@dataclass
class TrainConfig:
    """Everything that decides a training run. `None` fields are resolved when the run starts
    (and stored resolved in `run.json`, so a resumed run uses the same values)."""

    # model: a preset, optional ModelConfig field overrides, and the training context length
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    context_length: int | None = None  # None: the preset's (with init_from: INIT_FROM_CONTEXT)
    # continue training an imported model (a checkpoint folder or a Hub repo id) instead of a fresh
    # preset: its architecture, weights, tokenizer and vocabulary are kept
    init_from: str | None = None
    # data (see slm.data.DataSpec)
    data: str = DEFAULT_DATASET
    val_data: str | None = None
    max_stories: int | None = None
    text_field: str = "text"
    val_fraction: float = 0.01
    cache_dir: str = ".cache/slm-data"
    # length of the run: steps, or tokens (converted to steps), and/or a time budget in seconds
    max_steps: int | None = None  # None: from max_tokens, else DEFAULT_MAX_STEPS (unlimited with max_time alone)
    max_tokens: int | None = None
    max_time: float | None = None  # seconds of wall time (evaluations included); the schedule follows it
    # batch: batch_size sequences per device per micro-step, grad_accum micro-steps per optimizer step
    batch_size: int | None = None  # None: 4 on CPU (300 tiny steps in minutes), 32 on a GPU
    grad_accum: int = 1
    # optimizer and schedule: linear warmup to the peak, then `schedule` down to min_lr at the last step
    # (the defaults are the measured recipe: bench/QUALITY.md has the sweep that chose them)
    optimizer: str = "muon"  # "muon" (Muon for the blocks' matrices, AdamW for the rest), or "adamw"
    lr: float = 1e-2  # peak learning rate of the blocks' matrices and the norms
    embedding_lr: float | None = None  # peak learning rate of the (tied) token embedding; None: lr
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay) or "cosine"
    decay_fraction: float = 0.5  # wsd: the share of the run (steps, or time budget) spent decaying
    min_lr: float | None = None  # None: 0 with wsd, lr / 10 with cosine
    warmup_steps: int | None = None  # None: 5% of the steps (between 10 and 1000), or of a time budget alone
    weight_decay: float = 0.1  # matrices only; norms are never decayed
    # where a fresh model's token embedding starts: "cooccurrence" (the training text's PPMI-SVD vectors for
    # the ids it uses, slm/embedding_init.py: ~0.05 nats at 400k tokens of `tiny`) or "normal" (random)
    embedding_init: str = "cooccurrence"
    # share of each block branch's output dropped in training steps from pass `dropout_from_pass` over the
    # training text on (1-based; 0: never; never at inference): from the fourth, like the embedded input's
    # dropout and the late betas (from the second it cost 0.025 nats at two passes and gained nothing at eight)
    dropout: float = 0.1
    dropout_from_pass: int = 4
    # share of the embedded input (each element, before the first block) dropped in training steps from
    # pass `embedding_dropout_from_pass` on (1-based): it regularises a text seen many times and costs
    # where the text is still new
    embedding_dropout: float = 0.2
    embedding_dropout_from_pass: int = 4
    # sequence-level unlikelihood (slm/unlikelihood.py): weight of the term that trains the model out of
    # its own greedy loops, added in the last `unlikelihood_share` of the run (steps or time budget); 0 = off.
    # A repeat is a token that completes an `unlikelihood_ngram`-gram its continuation already holds: 8 marks
    # loops and spares the short repeats stories are made of (4 cost 0.035 nats at weight 0.3; 8 costs 0.03 at
    # 400k, 1M and 4.4M tokens of `tiny`, nothing measurable at 1.65M, and cuts greedy loops 5 -> 1 of 32)
    unlikelihood: float = 0.3
    unlikelihood_share: float = 0.1
    unlikelihood_ngram: int = 8
    # AdamW's betas (the embedding, the norms, an untied head; every matrix with "adamw"): the first pair
    # learns fastest (0.95 for beta2 lost 0.1 nats at 400k tokens of `tiny`); the late pair, from pass
    # `late_betas_from_pass` over the training text on (1-based; 0: never), memorises less of a text seen
    # many times (bench/QUALITY.md has the sweep: from the second pass on, it lost at two passes)
    beta1: float = 0.8
    beta2: float = 0.999
    late_beta1: float = 0.9
    late_beta2: float = 0.95
    late_betas_from_pass: int = 4
    muon_momentum: float = 0.9
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    # cadence
    log_every: int = 10
    eval_every: int | None = None  # None: a tenth of the run
    eval_batches: int = 8
    save_every: int | None = None  # None: at every evaluation
    sample_tokens: int = 64  # length of the sample story written at each evaluation (0: none)
    # where and how
    out: str | None = None  # the run folder; None: checkpoints/<preset>-<date>-<time>
    seed: int = 1337
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    # "auto": bf16 autocast on GPUs and CPUs that have bf16 (else fp16 on GPUs, fp32 on CPUs); "fp32", ...
    dtype: str = "auto"
    compile: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a clear message for values a run cannot use."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        positive = ["grad_accum", "log_every", "eval_batches"]
        optional_positive = [
            "context_length", "max_steps", "max_tokens", "batch_size", "eval_every", "save_every", "max_stories",
        ]
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            if name in MAX_VALUES and value > MAX_VALUES[name]:
                raise ValueError(f"{name} is {value:,}; at most {MAX_VALUES[name]:,} is allowed")
        if self.batch_size is not None and self.context_length is not None \
                and self.batch_size * self.context_length > MAX_TOKENS_PER_MICRO_STEP:
            raise ValueError(
                f"batch_size x context_length is {self.batch_size * self.context_length:,} tokens per micro-step; "
                f"at most {MAX_TOKENS_PER_MICRO_STEP:,} fit in memory (use --grad-accum for larger batches)"
            )
        for name in ("data", "text_field", "cache_dir", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("val_data", "out"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a mapping of ModelConfig fields, got {self.model!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device {self.device!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") \
                    from None
        for name in ("weight_decay", "grad_clip", "beta1", "beta2", "late_beta1", "late_beta2", "muon_momentum",
                     "val_fraction", "dropout", "embedding_dropout", "unlikelihood", "unlikelihood_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.embedding_init not in EMBEDDING_INITS:
            raise ValueError(f"embedding_init must be one of {EMBEDDING_INITS}, got {self.embedding_init!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if self.embedding_lr is not None and not (math.isfinite(self.embedding_lr) and self.embedding_lr > 0):
            raise ValueError(f"embedding_lr must be a positive number, got {self.embedding_lr!r}")
        if self.max_time is not None and not (
            isinstance(self.max_time, (int, float)) and not isinstance(self.max_time, bool)
            and math.isfinite(self.max_time) and self.max_time > 0
        ):
            raise ValueError(f"max_time must be a positive number of seconds, got {self.max_time!r}")
        if self.min_lr is not None and not (0 <= self.min_lr < self.lr):
            raise ValueError(f"min_lr must be at least 0 and below lr ({self.lr}), got {self.min_lr!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.unlikelihood_share <= 1:
            raise ValueError(f"unlikelihood_share must be in [0, 1], got {self.unlikelihood_share!r}")
        ngram = self.unlikelihood_ngram
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 2:
            raise ValueError(f"unlikelihood_ngram must be a whole number of at least 2, got {ngram!r}")
        for name in ("weight_decay", "grad_clip", "unlikelihood"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("late_betas_from_pass", "dropout_from_pass", "embedding_dropout_from_pass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a pass number (1 = the first; 0 = never), got {value!r}")
        for name in ("beta1", "beta2", "late_beta1", "late_beta2", "muon_momentum", "dropout", "embedding_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.sample_tokens < 0:
            raise ValueError(f"sample_tokens must be >= 0, got {self.sample_tokens}")

    def adamw_betas(self, epoch: int) -> tuple[float, float]:
        """AdamW's betas for a step in pass `epoch` (0-based) over the training text."""
        if self.late_betas_from_pass and epoch + 1 >= self.late_betas_from_pass:
            return self.late_beta1, self.late_beta2
        return self.beta1, self.beta2

    def dropout_rates(self, epoch: int) -> tuple[float, float]:
        """(branch, embedding) dropout of a step in pass `epoch` (0-based) over the training text."""
        def from_pass(first: int) -> bool:
            return first > 0 and epoch + 1 >= first

        return (self.dropout if from_pass(self.dropout_from_pass) else 0.0,
                self.embedding_dropout if from_pass(self.embedding_dropout_from_pass) else 0.0)

    def model_config(self) -> ModelConfig:
        overrides = dict(self.model)
        if self.context_length is not None:
            overrides["context_length"] = self.context_length
        return preset(self.preset, **overrides)

    def data_spec(self) -> DataSpec:
        return DataSpec(self.data, self.max_stories, self.text_field, self.val_fraction, self.val_data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        write_text_nofollow(path, self.to_json() + "\n")  # a symlink named run.json is replaced, not followed

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_json(Path(path).read_text())


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float) -> float:
    """Seconds from "300", "90s", "10m", "1.5h" (a bare number is seconds)."""
    value = str(text).strip().lower()
    unit = DURATION_UNITS.get(value[-1:]) if value else None
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a duration; write seconds (300) or 90s, 10m, 1h") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """The `run.json` of a run folder as a dict (fields it predates filled with the values it ran with),
    or a ValueError saying what is wrong with it."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no {RUN_CONFIG_FILE}")
    try:
        if path.stat().st_size > 1024 * 1024:
            raise ValueError(f"{path} is too large to be a run record")
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the run cannot be resumed from it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object; the run cannot be resumed from it")
    return {**VALUES_OF_OLDER_RECORDS, **data}


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The validated TrainConfig in a run folder's run.json."""
    data = read_run_record(run_dir)
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{Path(run_dir) / RUN_CONFIG_FILE} is not a valid run record: {exc}") from None


def check_run_paths(config: TrainConfig, run_dir: str | Path, roots: list[Path]) -> None:
    """Refuse a run whose data, token cache or output lie outside `roots` (or whose output is not `run_dir`).

    A run record is a file on disk like any other (a Hub download can bring one), so a resumed job
    must not take its word for where to read and write.
    """
    run_dir = Path(run_dir).resolve()
    where = run_dir / RUN_CONFIG_FILE
    try:
        inside(run_dir, roots)
        if config.out is not None and Path(config.out).expanduser().resolve() != run_dir:
            raise PathNotAllowed(f"its output folder {config.out} is not the run folder {run_dir}")
        inside(config.cache_dir, roots, base=Path.cwd())
        for source in (config.data, config.val_data):
            if source is None:
                continue
            for file in local_files(source) or []:  # None: a hub dataset name, read through the hub's own cache
                inside(file, roots)
    except PathNotAllowed as exc:
        raise ValueError(f"{where} is refused: {exc}") from None


def resume_config(run_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The config of an existing run, marked to resume, with non-None `overrides` applied."""
    run_dir = Path(run_dir)
    data = read_run_record(run_dir)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("max_tokens") is not None and overrides.get("max_steps") is None:
        data["max_steps"] = None  # recompute the steps from the new token budget
    data["out"], data["resume"] = str(run_dir), True
    try:
        return TrainConfig.from_dict(data)
    except TypeError as exc:
        raise ValueError(f"{run_dir / RUN_CONFIG_FILE} is not a valid run record: {exc}") from None


def resolve_config(config: TrainConfig, device: torch.device, world_size: int) -> TrainConfig:
    """Fill every `None` default; the result is what run.json stores."""
    c = dataclasses.replace(config, model=dict(config.model))
    if c.context_length is None:
        c.context_length = INIT_FROM_CONTEXT if c.init_from else c.model_config().context_length
    recipe = GPU_RECIPES.get(c.preset, {}) if device.type == "cuda" and not (c.model or c.init_from) else {}
    if c.batch_size is None:
        c.batch_size = recipe.get("batch_size", GPU_BATCH_SIZE) if device.type == "cuda" else CPU_BATCH_SIZE
        if c.max_steps is None and c.max_tokens is None and c.max_time is None and c.data == DEFAULT_DATASET:
            c.max_tokens = recipe.get("max_tokens")  # the whole recipe: a full TinyStories epoch
    if c.max_steps is None and (c.max_tokens or c.max_time is None):  # a time budget alone: no step limit
        tokens_per_step = c.batch_size * c.grad_accum * c.context_length * world_size
        c.max_steps = math.ceil(c.max_tokens / tokens_per_step) if c.max_tokens else DEFAULT_MAX_STEPS
    if c.min_lr is None:
        c.min_lr = 0.0 if c.schedule == "wsd" else c.lr / 10
    if c.warmup_steps is None and c.max_steps is not None:  # a time budget alone keeps None: warmup by time
        c.warmup_steps = min(1000, max(10, c.max_steps // round(1 / WARMUP_SHARE)))
    if c.eval_every is None and c.max_steps is not None:
        c.eval_every = max(1, c.max_steps // 10)  # a time budget alone: after each tenth of the budget
    if c.save_every is None:
        c.save_every = c.eval_every  # None: at every evaluation
    if c.out is None:
        c.out = str(Path("checkpoints") / f"{c.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    c.validate()
    return c
