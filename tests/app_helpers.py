"""Launching the real playground in-process for the API and browser tests."""

from __future__ import annotations

import random
import socket
from contextlib import contextmanager
from pathlib import Path

import torch

from slm import ModelConfig, build_model, save_checkpoint

CHECKPOINT_KEY = "small-run/best"


def playground_config(**overrides) -> ModelConfig:
    """A small model with the real GPT-2 vocabulary (the app tokenizes real text), built in milliseconds.

    Three layers (sliding, sliding, global) with a window of 4, so sliding attention binds on short
    texts. A large init_std makes the untrained model's predictions peaked rather than uniform, so
    tests that compare probabilities compare numbers that differ from token to token.
    """
    values = dict(
        context_length=64, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16,
        intermediate_size=64, sliding_window=4, sliding_window_pattern=3, init_std=0.3,
    )
    values.update(overrides)
    return ModelConfig(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(
    checkpoints_dir: Path, config, key: str = CHECKPOINT_KEY, step: int = 120, seed: int = 0, **metadata_extra
) -> Path:
    """A real checkpoint folder of a small random model, as training writes it."""
    model = build_model(config, seed=seed)
    metadata = {"preset": None, "step": step, "tokens": step * 1024, "val_loss": 6.25, "train_loss": 6.5,
                "created": "2025-01-01T00:00:00", **metadata_extra}
    return save_checkpoint(checkpoints_dir / key, model, metadata)


def write_stories(path: Path, count: int = 300, seed: int = 0) -> Path:
    """A small TinyStories-like training file (raw format: stories separated by <|endoftext|> lines)."""
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Max", "Sue", "Ben", "Mia"]
    things = ["ball", "cat", "tree", "boat", "cake", "kite"]
    moods = ["happy", "sad", "sleepy", "brave"]
    stories = []
    for _ in range(count):
        name, thing, mood = rng.choice(names), rng.choice(things), rng.choice(moods)
        stories.append(
            f"Once upon a time, there was a little girl named {name}. She had a red {thing}. "
            f"One day, the {thing} was lost. {name} was {mood}. Her mom helped her look for it. "
            f"They found the {thing} under the bed. {name} said thank you and smiled."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    return path


@contextmanager
def running_app(checkpoints_dir: Path, data_dir: Path, **settings_options):
    """The app with its real TrainingManager, served on a free port; yields (url, manager).

    `settings_options` are AppSettings fields (default_model, demo, zero_gpu).

    On exit a training job still running is stopped and waited for, so no test leaves a process behind.
    """
    from slm.jobs import TrainingManager
    from ui import build_app, launch_options
    from ui.common import AppSettings

    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = AppSettings(checkpoints_dir.resolve(), data_dir.resolve(), torch.device("cpu"), torch.float32,
                           **settings_options)
    manager = TrainingManager(runs_root=settings.checkpoints_dir)
    demo = build_app(settings, manager)
    demo.queue(default_concurrency_limit=2)
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **launch_options()
    )
    try:
        yield url, manager
    finally:
        if manager.stop():
            manager.wait(timeout=60)
        demo.close()
