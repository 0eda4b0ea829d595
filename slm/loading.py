"""One entry point for weights on disk: our checkpoint folders and transformers Gemma 3 folders alike.

`load(path)` gives the model together with its tokenizer (the folder's `tokenizer.json`, or GPT-2),
refusing a pair that does not fit; `load_model(path)` gives the model alone.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_checkpoint,
    read_config,
    read_json,
    read_metadata,
    recover_directory,
    refuse_links_out,
    refuse_pickle,
)
from .config import ModelConfig, count_parameters
from .hf import config_from_hf, is_hf_config, load_hf_model
from .hub import download, is_repo_id
from .model import Gemma3LM
from .snapshots import is_snapshot_path
from .tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer, has_tokenizer_files, load_tokenizer


def _folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    refuse_pickle(path)
    folder = path.parent if path.is_file() else path
    refuse_links_out(folder)
    return folder


def load_model(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Gemma3LM:
    """A model in eval mode from our checkpoint folder or a transformers Gemma 3 text folder."""
    folder = _folder(path)
    if is_hf_config(read_json(folder / CONFIG_FILE)):
        try:
            return load_hf_model(folder, device=device, dtype=dtype)
        except (KeyError, TypeError, OverflowError) as exc:
            raise CheckpointError(f"{folder} is not a valid Gemma 3 checkpoint: {type(exc).__name__}: {exc}") from exc
    return load_checkpoint(folder, device=device, dtype=dtype)


@dataclass
class LoadedModel:
    """A model and the tokenizer it was trained with: what every tab and script works with."""

    model: Gemma3LM
    tokenizer: Tokenizer
    path: Path | None = None


def check_tokenizer_fits(vocab_size: int, tokenizer: Tokenizer, folder: Path | None = None) -> None:
    """Refuse a model and tokenizer that do not belong together, saying what is missing.

    The tokenizer must not produce ids the model has no row for; and a model whose vocabulary is not
    GPT-2's needs its own tokenizer files (a Gemma 3 folder without `tokenizer.json` would otherwise
    be read with GPT-2's 50,257 tokens and its output decoded into nonsense, or not at all).
    """
    where = f"{folder} " if folder is not None else "the model "
    if tokenizer.is_gpt2 and vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"{where}has a {vocab_size:,}-token vocabulary but no tokenizer files ({TOKENIZER_FILE} and "
            f"{TOKENIZER_CONFIG_FILE}), and the bundled GPT-2 tokenizer has {tokenizer.vocab_size:,} tokens. "
            f"Copy the model's {TOKENIZER_FILE} and {TOKENIZER_CONFIG_FILE} into the folder (for a Hub model, "
            "download it again: the tokenizer files come with it)."
        )
    if tokenizer.max_ordinary_id >= vocab_size:
        raise CheckpointError(
            f"{where}has a {vocab_size:,}-token vocabulary, but its tokenizer ({tokenizer.name}) produces ids up "
            f"to {tokenizer.max_ordinary_id:,}: they belong to different models."
        )


def _recorded_tokenizer_missing(folder: Path) -> None:
    recorded = read_metadata(folder).get("tokenizer") or {}
    if recorded.get("name") not in (None, "gpt2") and not has_tokenizer_files(folder):
        raise CheckpointError(
            f"{folder} was trained with its own tokenizer ({recorded.get('name')}, {recorded.get('vocab_size')} "
            f"tokens) but {TOKENIZER_FILE} is missing from the folder; copy it back beside the weights."
        )


def load(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    download_dir: str | Path | None = None,
) -> LoadedModel:
    """The model and its tokenizer from a checkpoint folder, a transformers Gemma 3 folder, or a Hub
    repo id (downloaded, with its tokenizer, into `download_dir` or the Hugging Face cache).

        lm = slm.load("google/gemma-3-270m")     # or a folder
        ids = lm.tokenizer.encode("Once upon a time")
    """
    text = str(path)
    if not Path(text).expanduser().exists() and is_repo_id(text):
        path = download(text, download_dir)
    folder = _folder(path)
    _recorded_tokenizer_missing(folder)
    tokenizer = load_tokenizer(folder)
    info = read_checkpoint_info(folder)
    check_tokenizer_fits(info.config.vocab_size, tokenizer, folder)  # before reading any weights
    return LoadedModel(load_model(folder, device=device, dtype=dtype), tokenizer, folder)


@dataclass
class CheckpointInfo:
    """What a checkpoint picker shows, read without loading any weights."""

    path: Path
    config: ModelConfig
    parameters: int
    format: str  # "slm" or "transformers"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def step(self) -> int | None:
        return self.metadata.get("step")

    @property
    def val_loss(self) -> float | None:
        return self.metadata.get("val_loss")

    @property
    def preset(self) -> str | None:
        return self.metadata.get("preset")


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    folder = _folder(path)
    data = read_json(folder / CONFIG_FILE)
    if is_hf_config(data):
        try:
            config, fmt = config_from_hf(data), "transformers"
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointError(f"{folder / CONFIG_FILE} is not a valid Gemma 3 config: {exc}") from exc
        has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    else:
        config, fmt = read_config(folder), "slm"
        has_weights = (folder / "model.safetensors").is_file()
    if not has_weights:
        raise CheckpointError(f"{folder} has a config.json but no safetensors weights")
    return CheckpointInfo(folder, config, count_parameters(config).total, fmt, read_metadata(folder))


@dataclass
class UnreadableCheckpoint:
    """A folder that looks like a checkpoint (it has a config.json) but cannot be used, and why."""

    path: Path
    reason: str

    @property
    def name(self) -> str:
        return self.path.name


def _candidate_folders(root: Path) -> list[Path]:
    """Folders under `root` holding a config.json; hidden folders (a save's staging copies) and symlinked
    folders are not entered. Interrupted saves met on the way are finished or rolled back first."""
    folders = []
    for here, dirs, files in os.walk(root, followlinks=False, onerror=lambda _exc: None):
        here_path = Path(here)
        for name in dirs:
            if name.startswith(".") and any(f".{stage}-" in name for stage in ("tmp", "new", "old")):
                final = name[1:].rsplit(".", 1)[0] if "." in name[1:] else None
                if final:
                    with contextlib.suppress(OSError):
                        recover_directory(here_path / final)
        present = set(os.listdir(here_path)) if here_path.is_dir() else set()
        dirs[:] = sorted(d for d in present if not d.startswith(".") and (here_path / d).is_dir()
                         and not (here_path / d).is_symlink())
        if CONFIG_FILE in files or CONFIG_FILE in present:
            folders.append(here_path)
    return folders


def scan_checkpoints(
    root: str | Path, include_snapshots: bool = False
) -> tuple[list[CheckpointInfo], list[UnreadableCheckpoint]]:
    """Every checkpoint folder under `root` (any depth), newest first, and the damaged ones with the reason.

    One bad folder never hides the others: whatever goes wrong reading it is its own entry's reason. A
    run's snapshots (`<run>/snapshots/step-*`, see slm/snapshots.py) are left out unless asked for.
    """
    root = Path(root)
    if not root.is_dir():
        return [], []
    found: list[tuple[float, CheckpointInfo]] = []
    bad: list[UnreadableCheckpoint] = []
    for folder in _candidate_folders(root):
        if not include_snapshots and is_snapshot_path(folder):
            continue
        try:
            info = read_checkpoint_info(folder)
            found.append(((folder / CONFIG_FILE).stat().st_mtime, info))
        except CheckpointError as exc:
            bad.append(UnreadableCheckpoint(folder, str(exc)))
        except Exception as exc:
            bad.append(UnreadableCheckpoint(folder, f"{type(exc).__name__}: {exc}"))
    found.sort(key=lambda pair: pair[0], reverse=True)
    return [info for _, info in found], bad


def list_checkpoints(root: str | Path, include_snapshots: bool = False) -> list[CheckpointInfo]:
    """Every loadable checkpoint folder under `root` (any depth), newest first; damaged ones are skipped."""
    return scan_checkpoints(root, include_snapshots)[0]
