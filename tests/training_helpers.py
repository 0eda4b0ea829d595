"""Helpers for the training tests: synthetic stories the tests write themselves, and a training
config small enough to run a step in a few tens of milliseconds on a CPU.

A plain module rather than conftest.py, so other test suites keep their own conftest. Importing it
puts the process (and the subprocesses it starts) offline.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_STORIES = REPO / ".." / "shared" / "data" / "tinystories"

# A model with the full GPT-2 vocabulary but tiny blocks: what the loop does, not what the model learns.
TINY_MODEL: dict[str, Any] = dict(
    hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
    sliding_window=16, sliding_window_pattern=2,
)

NAMES = ["Lily", "Tom", "Max", "Sue", "Ben", "Mia", "Sam", "Anna"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "bear"]
PLACES = ["park", "garden", "forest", "house", "lake"]
FEELINGS = ["happy", "sad", "tired", "excited"]


def make_stories(count: int, seed: int = 0) -> list[str]:
    """Short stories from a small grammar: highly predictable, so a model learns them in a few steps."""
    rng = random.Random(seed)
    stories = []
    for _ in range(count):
        name, animal, place, feeling = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(FEELINGS)
        stories.append(
            f"Once upon a time, there was a little {animal} named {name}. {name} liked to play in the {place}.\n"
            f"One day, {name} saw a big {rng.choice(ANIMALS)} in the {place}. {name} was very {feeling}.\n"
            f"They played together all day. The end."
        )
    return stories


def write_raw_txt(path: Path, stories: list[str]) -> Path:
    """The raw TinyStories file format: stories separated by a line holding <|endoftext|>."""
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")
    return path


for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# One intra-op thread in the tests and their subprocesses: on a small shared machine, OpenMP threads
# that spin-wait for a descheduled sibling make a step many times slower; one thread degrades gently.
THREADS = "1"
torch.set_num_threads(int(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", THREADS)  # for workers that inherit the environment


def stories_file(folder: Path, count: int = 300) -> Path:
    """`folder/stories.txt` with `count` synthetic stories (written once, so its cache key stays put)."""
    path = folder / "stories.txt"
    return path if path.exists() else write_raw_txt(path, make_stories(count))


def quick_config(tmp_path: Path, data: Path, **overrides: Any) -> Any:
    from slm.train_config import TrainConfig

    values: dict[str, Any] = dict(
        preset="tiny", model=dict(TINY_MODEL), context_length=32, data=str(data), cache_dir=str(tmp_path / "cache"),
        batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2, log_every=1, eval_every=4, eval_batches=2,
        sample_tokens=8, device="cpu", out=str(tmp_path / "run"), val_fraction=0.1,
        dtype="fp32",  # exact comparisons; tests that want the default precision ask for "auto"
    )
    values.update(overrides)
    return TrainConfig(**values)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=THREADS)
    return env


PYTHON = sys.executable
