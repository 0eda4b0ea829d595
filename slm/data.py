"""Training data: text source -> stories -> tokens -> cached uint16 (uint32 for large vocabularies)
memmaps -> random windows.

A source is either a Hugging Face hub dataset name (default `roneneldan/TinyStories`) or local
files: the dataset's raw `.txt` format (stories separated by `<|endoftext|>` lines), `.jsonl`,
`.json` or `.parquet` with a text field, or a folder of them. Stories are tokenized in parallel and
written as one token stream per split with `<|endoftext|>` after every story, so the model learns
where a story ends and never sees two stories glued together.

The token streams are cached under a key made of the source (paths, sizes, modification times or
the hub name), the selection (story count, validation fraction, text field) and the tokenizer. A
cache folder is written under a temporary name and renamed when complete, so an interrupted
preparation never looks finished; the next run prepares again and later runs reuse the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_directory
from .tokenizer import EOT_TEXT, RANKS_SHA256, Tokenizer

DEFAULT_DATASET = "roneneldan/TinyStories"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
CACHE_FORMAT = 1  # bump when the layout of a cache folder or the tokenization changes
TOKENS_DTYPE = np.uint16  # GPT-2's 50,257 ids fit; half the disk and page cache of int32


def tokens_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 where every id fits (GPT-2), uint32 for larger vocabularies (Gemma's 262,144)."""
    return TOKENS_DTYPE if vocab_size <= np.iinfo(TOKENS_DTYPE).max + 1 else np.uint32
ENCODE_CHUNK_CHARS = 4_000_000  # stories are encoded in parallel in chunks of about this many characters
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DataError(ValueError):
    """The training data cannot be read or is unusable; the message says what to do instead."""


# ----- where the text comes from --------------------------------------------------------------------
def local_files(source: str | Path) -> list[Path] | None:
    """The data files a local source names, or None when `source` is a hub dataset name.

    A path that exists is local. A name that does not exist but is clearly a path (a known suffix,
    or starting with `/`, `.` or `~`) is a missing file, reported as such rather than sent to the hub.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"{path} has an unsupported extension; use one of {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"folder {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
        return files
    looks_like_path = text.startswith(("/", ".", "~")) or path.suffix.lower() in SUPPORTED_SUFFIXES
    if looks_like_path or not HUB_ID.match(text):
        raise DataError(f"data file {path} does not exist (working directory: {Path.cwd()})")
    return None


def _split_eot(pieces: Iterable[str]) -> Iterator[str]:
    """Stories from a stream of text pieces (lines) in which `<|endoftext|>` separates stories."""
    current: list[str] = []
    for piece in pieces:
        if EOT_TEXT not in piece:
            current.append(piece)
            continue
        parts = piece.split(EOT_TEXT)
        current.append(parts[0])
        for middle in parts[1:]:
            story = "".join(current).strip()
            if story:
                yield story
            current = [middle]
    story = "".join(current).strip()
    if story:
        yield story


def _text_of(record: Any, field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if field not in record:
            raise DataError(
                f"{where} has no field {field!r}; its records have fields {sorted(record)[:20]}. "
                f"Choose the field that holds the text (--text-field NAME)."
            )
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text")
        return value
    raise DataError(f"{where} holds a {type(record).__name__}; expected objects with a {field!r} field or strings")


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON: {exc}") from exc
            yield _text_of(record, field, f"{path} line {number}")


def _iter_json(path: Path, field: str) -> Iterator[str]:
    """A JSON array of records (or strings); files that are really JSON lines are read as such."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()[:1]
    if head != "[":
        yield from _iter_jsonl(path, field)
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    for index, record in enumerate(records):
        yield _text_of(record, field, f"{path} item {index}")


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # comes with `datasets`

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path} is not a readable parquet file: {exc}") from exc
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise DataError(
            f"{path} has no column {field!r}; its columns are {columns[:20]}. "
            f"Choose the column that holds the text (--text-field NAME)."
        )
    for batch in parquet.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def iter_file_stories(path: Path, text_field: str = "text") -> Iterator[str]:
    """The non-empty stories of one local file, stripped of surrounding whitespace."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from _split_eot(f)
        return
    readers = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}
    for text in readers[suffix](path, text_field):
        text = text.strip()
        if text:
            yield text


def hub_error_message(name: str, exc: BaseException) -> str:
    return (
        f"Could not load the dataset {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
        f"To train without the hub, download the text once (for TinyStories: TinyStories-train.txt from "
        f"https://huggingface.co/datasets/{DEFAULT_DATASET}) and pass it as a local file, e.g. "
        f"`python train.py --data path/to/TinyStories-train.txt`. A local .txt (stories separated by "
        f"<|endoftext|> lines), .jsonl, .json or .parquet file, or a folder of them, works too."
    )


def hub_split_names(name: str) -> list[str]:
    """The splits of a hub dataset (needs the hub)."""
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name))
    except Exception as exc:  # network, auth and "no such dataset" errors all mean: use a local file
        raise DataError(hub_error_message(name, exc)) from exc


def iter_hub_stories(name: str, split: str, max_stories: int | None, text_field: str = "text") -> Iterator[str]:
    """Stories of one split of a hub dataset: streamed when only the first `max_stories` are wanted."""
    import datasets

    try:
        if max_stories is not None:
            records: Iterable[dict[str, Any]] = datasets.load_dataset(name, split=split, streaming=True)
        else:
            records = datasets.load_dataset(name, split=split)
        for index, record in enumerate(records):
            if max_stories is not None and index >= max_stories:
                break
            text = _text_of(record, text_field, f"hub dataset {name!r} ({split})").strip()
            if text:
                yield text
    except DataError:
        raise
    except Exception as exc:
        raise DataError(hub_error_message(name, exc)) from exc


# ----- what is selected ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """Which text to train and validate on.

    Without a validation source, every `round(1 / val_fraction)`-th story (starting with the first)
    is held out for validation: deterministic and spread over the whole source. The hub's own
    validation split is used when it has one; with `max_stories` only its first
    `max(200, max_stories // 20)` stories are taken.
    """

    source: str = DEFAULT_DATASET
    max_stories: int | None = None  # the first N stories of the source (before holding any out)
    text_field: str = "text"
    val_fraction: float = 0.01
    val_source: str | None = None  # a separate validation source (used whole)

    def __post_init__(self) -> None:
        if self.max_stories is not None and self.max_stories < 1:
            raise DataError(f"max_stories must be at least 1, got {self.max_stories}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")

    @property
    def holdout_every(self) -> int:
        return max(2, round(1.0 / self.val_fraction))


def _source_identity(source: str) -> dict[str, Any]:
    files = local_files(source)
    if files is None:
        return {"hub": source}
    return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_key(spec: DataSpec, tokenizer: Tokenizer) -> str:
    """A digest of everything that decides the cached tokens."""
    description = {
        "format": CACHE_FORMAT,
        "source": _source_identity(spec.source),
        "val_source": _source_identity(spec.val_source) if spec.val_source else None,
        "max_stories": spec.max_stories,
        "text_field": spec.text_field,
        "holdout_every": None if spec.val_source else spec.holdout_every,
        "tokenizer": [tokenizer.identity or RANKS_SHA256, tokenizer.eot_id, tokenizer.vocab_size],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def _first(stories: Iterable[str], limit: int | None) -> Iterator[str]:
    for index, story in enumerate(stories):
        if limit is not None and index >= limit:
            return
        yield story


def _local_stories(source: str, text_field: str) -> Iterator[str]:
    for path in local_files(source) or []:
        yield from iter_file_stories(path, text_field)


def _stories_of(source: str, text_field: str, split: str, limit: int | None) -> Iterator[str]:
    if local_files(source) is None:
        return iter_hub_stories(source, split, limit, text_field)
    return _first(_local_stories(source, text_field), limit)


def split_streams(spec: DataSpec) -> tuple[Iterator[tuple[str, str]], int | None]:
    """Pairs (split, story) in source order, and the number of stories when known in advance."""
    if spec.val_source is not None:
        def both() -> Iterator[tuple[str, str]]:
            for story in _stories_of(spec.source, spec.text_field, "train", spec.max_stories):
                yield "train", story
            for story in _stories_of(spec.val_source, spec.text_field, "validation", None):
                yield "val", story
        return both(), None

    if local_files(spec.source) is None and "validation" in hub_split_names(spec.source):
        val_limit = None if spec.max_stories is None else max(200, spec.max_stories // 20)

        def hub_both() -> Iterator[tuple[str, str]]:
            for story in iter_hub_stories(spec.source, "train", spec.max_stories, spec.text_field):
                yield "train", story
            for story in iter_hub_stories(spec.source, "validation", val_limit, spec.text_field):
                yield "val", story
        total = None if spec.max_stories is None else spec.max_stories + val_limit
        return hub_both(), total

    every = spec.holdout_every

    def held_out() -> Iterator[tuple[str, str]]:
        for index, story in enumerate(_stories_of(spec.source, spec.text_field, "train", spec.max_stories)):
            yield ("val" if index % every == 0 else "train"), story
    return held_out(), spec.max_stories


# ----- tokens on disk ------------------------------------------------------------------------------
@dataclass
class PreparedData:
    """The token streams of both splits, memory-mapped read-only."""

    folder: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    reused: bool  # True when an earlier preparation was found in the cache


def _open_prepared(folder: Path, reused: bool) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta.get("dtype", np.dtype(TOKENS_DTYPE).name))
    arrays = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        arrays[split] = (
            np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size
            else np.zeros(0, dtype=dtype)
        )
    return PreparedData(folder, arrays["train"], arrays["val"], meta, reused)


def _chunks(pairs: Iterable[tuple[str, str]], max_chars: int) -> Iterator[list[tuple[str, str]]]:
    chunk: list[tuple[str, str]] = []
    size = 0
    for pair in pairs:
        chunk.append(pair)
        size += len(pair[1])
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _describe(spec: DataSpec) -> str:
    what = spec.source if spec.max_stories is None else f"the first {spec.max_stories} stories of {spec.source}"
    return what


def prepare_data(
    spec: DataSpec,
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    progress: bool = True,
    num_threads: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PreparedData:
    """Tokenize the selected stories once (in parallel) and return both splits as memmaps.

    `should_stop` is polled between chunks so a stop request during a long preparation is honoured;
    the partial folder is discarded and nothing is cached.
    """
    dtype = tokens_dtype(tokenizer.vocab_size)
    cache_dir = Path(cache_dir).expanduser()
    key = cache_key(spec, tokenizer)
    folder = cache_dir / key
    if (folder / "meta.json").is_file():
        return _open_prepared(folder, reused=True)
    # atomic_directory removes the staging folders of interrupted preparations, and only theirs: another
    # process preparing the same text at this moment keeps its folder, and the last to finish wins

    from tqdm.auto import tqdm

    pairs, total = split_streams(spec)
    threads = num_threads or os.cpu_count() or 1
    counts = {"train": [0, 0], "val": [0, 0]}  # stories, tokens
    started = time.perf_counter()
    with atomic_directory(folder) as tmp:
        files = {split: open(tmp / f"{split}.bin", "wb") for split in ("train", "val")}  # noqa: SIM115
        bar = tqdm(total=total, unit=" stories", desc="tokenizing", disable=not progress, mininterval=1.0)
        try:
            for chunk in _chunks(pairs, ENCODE_CHUNK_CHARS):
                if should_stop is not None and should_stop():
                    raise InterruptedError("data preparation was stopped")
                for split, out in files.items():
                    stories = [story for s, story in chunk if s == split]
                    ids = tokenizer.encode_documents(stories, num_threads=threads)  # each story + end-of-text
                    out.write(ids.astype(dtype).tobytes())
                    counts[split][0] += len(stories)
                    counts[split][1] += ids.size
                bar.update(len(chunk))
                bar.set_postfix(tokens=f"{counts['train'][1] + counts['val'][1]:,}", refresh=False)
        finally:
            bar.close()
            for f in files.values():
                f.close()
        if counts["train"][0] + counts["val"][0] == 0:
            raise DataError(f"{_describe(spec)} holds no text: every story is empty")
        if counts["train"][1] < 2:
            raise DataError(
                f"{_describe(spec)} has too few stories to hold some out for validation "
                f"({counts['val'][0]} went to validation, none is left for training); use more text"
            )
        if counts["val"][1] < 2:
            raise DataError(f"the validation text of {_describe(spec)} is empty; use more text or another --val-data")
        meta = {
            "format": CACHE_FORMAT,
            "source": spec.source,
            "val_source": spec.val_source,
            "max_stories": spec.max_stories,
            "text_field": spec.text_field,
            "holdout_every": None if spec.val_source else spec.holdout_every,
            "train_stories": counts["train"][0],
            "train_tokens": counts["train"][1],
            "val_stories": counts["val"][0],
            "val_tokens": counts["val"][1],
            "eot_id": tokenizer.eot_id,
            "dtype": np.dtype(dtype).name,
            "seconds": round(time.perf_counter() - started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return _open_prepared(folder, reused=False)


# ----- batches -------------------------------------------------------------------------------------
def window_length(tokens: np.ndarray, context_length: int) -> int:
    """Windows are context + 1 tokens; a split shorter than that gets windows as long as it allows."""
    if tokens.size < 2:
        raise DataError("a data split holds fewer than two tokens")
    return min(context_length, tokens.size - 1)


def gather_windows(
    tokens: np.ndarray, starts: torch.Tensor, length: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (B, length) for windows starting at `starts`."""
    rows = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts.tolist()])
    batch = torch.from_numpy(rows)
    device = torch.device(device)
    # on CUDA, pinned host memory lets the copy overlap with compute
    pinned = device.type == "cuda"
    batch = batch.pin_memory().to(device, non_blocking=True) if pinned else batch.to(device)
    return batch[:, :-1], batch[:, 1:]


class BatchSampler:
    """Windows of context+1 tokens, drawn in epochs, reproducible from a seed and resumable from a count.

    Each epoch cuts the split into back-to-back windows at a random offset and visits them in a
    random order: a run sees as much distinct text as its token count allows, where windows drawn at
    random starts would leave e^-1 (37%) of one epoch's worth of text unseen and show other parts twice.
    Every rank computes the same global batch of `world_size * batch_size` windows and keeps its own
    slice, so N ranks see exactly the windows that one process with an N times larger batch would see.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        context_length: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.length = window_length(tokens, context_length)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.seed = seed
        # windows per epoch: the last window's target may end at the split's last token
        self.windows_per_epoch = max(1, (tokens.size - self.length) // self.length)
        self.draws = 0
        self._epoch: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, order)

    @property
    def epoch(self) -> int:
        """The pass over the split that the next batch starts in (0: the first)."""
        return self.draws * self.world_size * self.batch_size // self.windows_per_epoch

    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        """The epoch's offset and window order: a function of (seed, epoch) alone, so resuming needs no RNG state."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            slack = min(self.length - 1, self.tokens.size - 1 - self.windows_per_epoch * self.length)
            offset = int(rng.integers(0, slack + 1))
            self._epoch = (epoch, offset, rng.permutation(self.windows_per_epoch))
        return self._epoch[1], self._epoch[2]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.world_size * self.batch_size
        first = self.draws * size + self.rank * self.batch_size
        starts = []
        for index in range(first, first + self.batch_size):
            epoch, position = divmod(index, self.windows_per_epoch)
            offset, order = self._epoch_plan(epoch)
            starts.append(offset + int(order[position]) * self.length)
        self.draws += 1
        return gather_windows(self.tokens, torch.tensor(starts), self.length, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])


def eval_window_starts(
    tokens: np.ndarray, batch_size: int, context_length: int, num_batches: int
) -> list[torch.Tensor]:
    """A fixed set of validation windows, evenly spread over the split, so every evaluation is comparable."""
    length = window_length(tokens, context_length)
    count = batch_size * num_batches
    last = tokens.size - length - 1
    starts = torch.linspace(0, last, count).round().long() if count > 1 else torch.zeros(1, dtype=torch.long)
    return [starts[i * batch_size : (i + 1) * batch_size] for i in range(math.ceil(count / batch_size))]
