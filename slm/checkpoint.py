"""Checkpoints: a folder holding `config.json`, `model.safetensors`, (optionally) `metadata.json`, and
the tokenizer files of a model that does not use the bundled GPT-2 tokenizer (`tokenizer.json`, ...).

Folders are written atomically: everything goes into a temporary sibling folder that is renamed into
place only when complete, so a crash while saving leaves the previous checkpoint loadable. Weights
are only ever read from safetensors; pickle files are refused without being opened.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import Gemma3LM
from .tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or in a format we refuse to read."""


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final` in one rename.

    If the block raises, the temporary folder is removed and `final` is untouched. An existing
    `final` is moved aside first and deleted only after the new folder is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for child in tmp.iterdir():  # make the files durable before they become visible
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: not a checkpoint folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def read_config(folder: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(read_json(folder / CONFIG_FILE))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a valid model config: {exc}") from exc


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except CheckpointError:
        return {}


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
    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}")
    state = read_safetensors(weights)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    model = Gemma3LM(config)
    try:
        model.load_export_state_dict(state)
    except ValueError as exc:
        raise CheckpointError(f"{weights} does not match {folder / CONFIG_FILE}: {exc}") from exc
    return model.to(device=device, dtype=dtype).eval()
