"""One entry point for weights on disk: our checkpoint folders and transformers Gemma 3 folders alike."""

from __future__ import annotations

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
    refuse_pickle,
)
from .config import ModelConfig, count_parameters
from .hf import config_from_hf, is_hf_config, load_hf_model
from .model import Gemma3LM
from .snapshots import is_snapshot_path


def _folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    refuse_pickle(path)
    return path.parent if path.is_file() else path


def load_model(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Gemma3LM:
    """A model in eval mode from our checkpoint folder or a transformers Gemma 3 text folder."""
    folder = _folder(path)
    if is_hf_config(read_json(folder / CONFIG_FILE)):
        return load_hf_model(folder, device=device, dtype=dtype)
    return load_checkpoint(folder, device=device, dtype=dtype)


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
        config, fmt = config_from_hf(data), "transformers"
        has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    else:
        config, fmt = read_config(folder), "slm"
        has_weights = (folder / "model.safetensors").is_file()
    if not has_weights:
        raise CheckpointError(f"{folder} has a config.json but no safetensors weights")
    return CheckpointInfo(folder, config, count_parameters(config).total, fmt, read_metadata(folder))


def list_checkpoints(root: str | Path, include_snapshots: bool = False) -> list[CheckpointInfo]:
    """Every loadable checkpoint folder under `root` (any depth), newest first; damaged ones are skipped.

    A run's snapshots (`<run>/snapshots/step-*`, see slm/snapshots.py) are left out unless asked for.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for config_path in root.rglob(CONFIG_FILE):
        folder = config_path.parent
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue  # temporary or moved-aside folders of an atomic write
        if not include_snapshots and is_snapshot_path(folder):
            continue
        try:
            found.append(read_checkpoint_info(folder))
        except CheckpointError:
            continue
    found.sort(key=lambda info: (info.path / CONFIG_FILE).stat().st_mtime, reverse=True)
    return found
