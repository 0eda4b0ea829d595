"""Snapshots: the weights of a run at steps spaced so that early learning is dense and late learning
sparse (0, 10, 20, 50, 100, 200, 500, 1,000, ... and the last step), kept so that a viewer can watch
one text through the whole run.

Each snapshot is an ordinary checkpoint folder, `<run>/snapshots/step-000100/` (config.json,
model.safetensors, metadata.json with `step`, `tokens_seen` and `snapshot: true`), loadable with
`slm.load_model`. Only the weights are kept, and matrices in bf16: the probabilities a viewer reads
off a snapshot differ from the fp32 weights' by well under a percentage point (tests/test_watch.py
checks), at half the size. One-dimensional weights (the norms) stay fp32: they are tiny.
`list_checkpoints` leaves snapshots out unless asked, so the model picker is not cluttered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, atomic_directory, read_metadata, write_json
from .model import Gemma3LM

SNAPSHOTS_DIR = "snapshots"
SNAPSHOT_PREFIX = "step-"
SNAPSHOT_DTYPE = torch.bfloat16
MANTISSAS = (1, 2, 5)  # 10, 20, 50, 100, 200, 500, ...


def snapshot_steps(max_steps: int) -> list[int]:
    """The planned snapshot steps of a run of `max_steps` steps: 0, 10, 20, 50, 100, ... and the last."""
    steps = {0, max_steps}
    scale = 10
    while scale <= max_steps:
        steps.update(m * scale for m in MANTISSAS if m * scale <= max_steps)
        scale *= 10
    return sorted(steps)


def is_snapshot_step(step: int, max_steps: int | None) -> bool:
    """True when `step` is 0, the last step, or 1, 2 or 5 times a power of ten (from 10 on)."""
    if step in (0, max_steps):
        return True
    if step < 10:
        return False
    while step % 10 == 0:
        step //= 10
    return step in MANTISSAS


def snapshot_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS_DIR / f"{SNAPSHOT_PREFIX}{step:06d}"


def is_snapshot_path(path: str | Path) -> bool:
    """Whether a checkpoint folder is a run's snapshot (the picker leaves these out)."""
    path = Path(path)
    return path.parent.name == SNAPSHOTS_DIR and path.name.startswith(SNAPSHOT_PREFIX)


def save_snapshot(
    run_dir: str | Path, model: Gemma3LM, step: int, tokens_seen: int, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the model's weights (matrices in bf16) as the snapshot of `step`, atomically."""
    folder = snapshot_folder(run_dir, step)
    state = {
        name: tensor.detach().to("cpu", SNAPSHOT_DTYPE if tensor.dim() > 1 else torch.float32).contiguous()
        for name, tensor in model.export_state_dict().items()
    }
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    info = {**(metadata or {}), "step": step, "tokens": tokens_seen, "tokens_seen": tokens_seen,
            "snapshot": True, "weights_dtype": "bfloat16 (matrices), float32 (norms)"}
    with atomic_directory(folder) as tmp:
        model.config.save(tmp / CONFIG_FILE)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / METADATA_FILE, info)
    return folder


def keep_snapshot(
    run_dir: str | Path, model: Gemma3LM, step: int, max_steps: int | None, tokens_seen: int,
    metadata: dict[str, Any] | None = None, last: bool = False,
) -> Path | None:
    """The training loop's hook: save a snapshot when `step` is planned (or is the `last` of a
    stopped run) and not kept yet; returns the folder written, else None."""
    if not (last or is_snapshot_step(step, max_steps)) or (snapshot_folder(run_dir, step) / WEIGHTS_FILE).is_file():
        return None
    return save_snapshot(run_dir, model, step, tokens_seen, metadata)


@dataclass
class Snapshot:
    """One kept snapshot of a run, read without loading its weights."""

    step: int
    tokens_seen: int
    path: Path
    metadata: dict[str, Any]


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """A run's snapshots in step order (folders without weights, or half-written ones, are skipped)."""
    folder = Path(run_dir) / SNAPSHOTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if not path.name.startswith(SNAPSHOT_PREFIX) or not (path / WEIGHTS_FILE).is_file():
            continue
        try:
            step = int(path.name.removeprefix(SNAPSHOT_PREFIX))
        except ValueError:
            continue
        metadata = read_metadata(path)
        tokens = metadata.get("tokens_seen", metadata.get("tokens", 0))
        found.append(Snapshot(step, int(tokens) if isinstance(tokens, int) else 0, path, metadata))
    return sorted(found, key=lambda s: s.step)


def runs_with_snapshots(root: str | Path) -> list[Path]:
    """Run folders under `root` (any depth) that hold at least one snapshot, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = {p.parent.parent.parent for p in root.rglob(f"{SNAPSHOTS_DIR}/{SNAPSHOT_PREFIX}*/{WEIGHTS_FILE}")}
    runs = {r for r in runs if not any(part.startswith(".") for part in r.relative_to(root).parts)}
    return sorted(runs, key=lambda r: (r / SNAPSHOTS_DIR).stat().st_mtime, reverse=True)
