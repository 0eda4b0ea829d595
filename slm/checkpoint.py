"""Checkpoints: a folder holding `config.json`, `model.safetensors`, (optionally) `metadata.json`, and
the tokenizer files of a model that does not use the bundled GPT-2 tokenizer (`tokenizer.json`, ...).

Folders are written atomically: everything goes into a temporary sibling folder that is renamed into
place only when complete, so a crash while saving leaves the previous checkpoint loadable. Weights
are only ever read from safetensors; pickle files are refused without being opened.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig, count_parameters
from .model import Gemma3LM
from .paths import links_leaving
from .tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or in a format we refuse to read."""


# A save goes through four names, so that at every instant a complete copy is findable:
#   .NAME.tmp-PID-N   being written (incomplete; removed by recovery once PID is gone)
#   .NAME.new-PID-N   complete new copy, fsynced, waiting for its rename to NAME
#   .NAME.old-PID-N   the previous NAME, moved aside; deleted once the new NAME is in place
# `recover_directory` finishes or rolls back a save that a crash interrupted.
_STAGES = ("tmp", "new", "old")


def _stage_name(final: Path, stage: str, pid: int | None = None) -> str:
    return f".{final.name}.{stage}-{pid if pid is not None else os.getpid()}-{time.monotonic_ns()}"


def _stage_parts(final: Path, entry: Path) -> tuple[str, int] | None:
    """(stage, writer pid) for a staging folder of `final`, else None."""
    prefix = f".{final.name}."
    if not entry.name.startswith(prefix):
        return None
    stage, _, rest = entry.name[len(prefix):].partition("-")
    pid = rest.split("-", 1)[0]
    if stage not in _STAGES or not pid.isdigit():
        return None
    return stage, int(pid)


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def recover_directory(final: str | Path) -> Path | None:
    """Finish or roll back a save of `final` that a crash interrupted; remove its stale staging folders.

    When `final` is missing, the newest complete copy is renamed back into place: a `.new-*`
    (the save had finished writing) before an `.old-*` (the previous copy). Staging folders of a
    writer that is still running are left alone. Returns `final` when it exists afterwards.
    """
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return None
    stale: dict[str, list[Path]] = {stage: [] for stage in _STAGES}
    for entry in parent.iterdir():
        parts = _stage_parts(final, entry)
        if parts is None or not entry.is_dir() or entry.is_symlink():
            continue
        stage, pid = parts
        if not _writer_alive(pid):
            stale[stage].append(entry)
    if not final.exists() and not final.is_symlink():
        for stage in ("new", "old"):
            candidates = sorted(stale[stage], key=lambda p: p.stat().st_mtime, reverse=True)
            if candidates:
                os.replace(candidates[0], final)
                _fsync_dir(parent)
                stale[stage].remove(candidates[0])
                break
    for folders in stale.values():
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    return final if final.exists() else None


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final`, which is never missing meanwhile.

    If the block raises, the temporary folder is removed and `final` is untouched. The complete
    new folder is renamed to a `.new-*` name first; the old `final` then moves aside and the new
    one takes its place; the old one is deleted last. A crash between those renames leaves a
    complete `.new-*` or `.old-*` that `recover_directory` puts back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final)
    tmp = final.parent / _stage_name(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.iterdir():  # make the files durable before they become visible
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    new = final.parent / _stage_name(final, "new")
    os.replace(tmp, new)
    old = None
    if final.exists() or final.is_symlink():
        old = final.parent / _stage_name(final, "old")
        os.replace(final, old)
    os.replace(new, final)
    _fsync_dir(final.parent)
    if old is not None:
        if old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_model_files(
    folder: Path, model: Gemma3LM, metadata: dict[str, Any] | None = None, tokenizer: Tokenizer | None = None
) -> None:
    """Write config, weights (without vocabulary padding, contiguous, on CPU) and metadata into `folder`.

    With a `tokenizer`, the metadata records which one the model goes with, and its files (none for
    the bundled GPT-2) are copied beside the weights: one model, one tokenizer.
    """
    if tokenizer is not None:
        metadata = {**(metadata or {}), "tokenizer": tokenizer.metadata()}
        tokenizer.save(folder)
    model.config.save(folder / CONFIG_FILE)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.export_state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if metadata is not None:
        write_json(folder / METADATA_FILE, metadata)


def save_checkpoint(
    path: str | Path, model: Gemma3LM, metadata: dict[str, Any] | None = None, tokenizer: Tokenizer | None = None
) -> Path:
    """Save a model (and its tokenizer's files, see `write_model_files`) to a checkpoint folder, atomically."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_model_files(tmp, model, metadata, tokenizer)
    return path


def refuse_pickle(path: Path) -> None:
    """Raise if `path` is (or a folder holds only) pickled weights: unpickling runs arbitrary code."""
    candidates = [path] if path.is_file() else list(path.glob("*")) if path.is_dir() else []
    pickles = [p for p in candidates if p.suffix.lower() in PICKLE_SUFFIXES]
    has_safetensors = path.is_dir() and any(path.glob("*.safetensors"))
    if pickles and not has_safetensors:
        raise CheckpointError(
            f"{pickles[0]} is a pickle-based file; it is not loaded because unpickling can run "
            "arbitrary code. Convert it to safetensors (model.safetensors + config.json) first."
        )


def refuse_links_out(folder: Path) -> None:
    """Raise if a file of the checkpoint folder is a symlink that leads out of it: such a folder would
    make the app read a file it was never given."""
    try:
        leaving = links_leaving(folder)
    except OSError as exc:
        raise CheckpointError(f"{folder} cannot be read: {exc.strerror or exc}") from None
    if leaving:
        entry, target = leaving[0]
        raise CheckpointError(
            f"{entry} is a symbolic link to {target}, outside the checkpoint folder; it is not read. "
            "Copy the real file into the folder instead."
        )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes a safetensors file declares, read from its header alone (nothing allocated)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def check_weights_fit(config: ModelConfig, weights: Path, config_path: Path) -> None:
    """Compare the config's parameter count with the weights file's header before the model is built, so a
    config that claims absurd sizes is refused without allocating them."""
    shapes = safetensors_shapes(weights)
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    stored = sum(math.prod(shape) for shape in shapes.values())
    expected = count_parameters(config).total
    if stored != expected:
        raise CheckpointError(
            f"{config_path} describes a model of {expected:,} parameters but {weights} holds {stored:,}: "
            "the config and the weights do not belong together"
        )


def read_json(path: Path, max_bytes: int = 16 * 1024 * 1024) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: not a checkpoint folder")
    try:
        if path.stat().st_size > max_bytes:
            raise CheckpointError(f"{path} is {path.stat().st_size:,} bytes; a JSON file here holds at most "
                                  f"{max_bytes:,}")
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def read_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(read_json(folder / CONFIG_FILE))
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a valid model config: {exc}") from exc


# metadata fields a picker shows, and the types they must have; anything else is kept as it is
METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "tokens": (int,), "val_loss": (int, float), "train_loss": (int, float), "preset": (str,),
}


def clean_metadata(data: dict[str, Any]) -> dict[str, Any]:
    """Metadata with every known field of the wrong type (or a non-finite number) dropped."""
    clean = {}
    for key, value in data.items():
        types = METADATA_TYPES.get(key)
        if types is not None and value is not None:
            if isinstance(value, bool) or not isinstance(value, types):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
        clean[key] = value
    return clean


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return clean_metadata(read_json(path))
    except CheckpointError:
        return {}


TRAINING_STATE_FORMAT = 1
_NUMBER = (int, float)
# field -> (accepted types, may be None); what `training_state.json` must hold for a resume
TRAINING_STATE_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((int,), False), "step": ((int,), False), "elapsed_s": (_NUMBER, False),
    "best_val_loss": (_NUMBER, True), "last_val_loss": (_NUMBER, True), "last_train_loss": (_NUMBER, True),
    "interval_loss": (_NUMBER, False), "interval_steps": ((int,), False), "sampler_draws": ((int,), False),
    "optimizer": ((str,), False), "param_groups": ((list,), False), "scaler": ((dict,), True),
}


def read_training_state(path: Path) -> dict[str, Any]:
    """The scalars of a resumable checkpoint (`training_state.json`), checked field by field.

    A damaged file is reported as such (with what is wrong and what to do), never as a KeyError.
    """
    data = read_json(path)
    problems = []
    for name, (types, nullable) in TRAINING_STATE_FIELDS.items():
        if name not in data:
            problems.append(f"'{name}' is missing")
            continue
        value = data[name]
        if value is None and nullable:
            continue
        wrong_type = isinstance(value, bool) or not isinstance(value, types)
        not_finite = isinstance(value, float) and not math.isfinite(value) and name != "best_val_loss"
        negative_count = isinstance(value, int) and types == (int,) and value < 0
        if wrong_type or not_finite or negative_count:
            problems.append(f"'{name}' is {value!r}")
    if not problems and data["format"] != TRAINING_STATE_FORMAT:
        problems.append(f"its format is {data['format']}, this version reads {TRAINING_STATE_FORMAT}")
    if not problems and not all(isinstance(g, list) and all(isinstance(x, dict) for x in g)
                                for g in data["param_groups"]):
        problems.append("'param_groups' is not a list of optimizer groups")
    if problems:
        raise CheckpointError(
            f"{path} is damaged ({'; '.join(problems[:4])}), so this run cannot be resumed from it. "
            "Its weights still load for generation; start a new run (or restore the file) to keep training."
        )
    return data


def load_checkpoint(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Gemma3LM:
    """Load one of our checkpoint folders into a model in eval mode."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.exists():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    refuse_pickle(folder)
    refuse_links_out(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    check_weights_fit(config, weights, folder / CONFIG_FILE)
    state = read_safetensors(weights)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = Gemma3LM(config)
    try:
        model.load_export_state_dict(state)
    except ValueError as exc:
        raise CheckpointError(f"{weights} does not match {folder / CONFIG_FILE}: {exc}") from exc
    return model.to(device=device, dtype=dtype).eval()
