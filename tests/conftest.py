"""Shared fixtures. The suite runs offline: nothing here may reach the network."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from slm.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TINYSTORIES = SHARED_DATA / "tinystories"


def small_config(**overrides) -> ModelConfig:
    """A model small enough to run in milliseconds, with sliding layers that really slide."""
    values = dict(
        vocab_size=300, context_length=64, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, sliding_window=8, sliding_window_pattern=2,
        rope_local_base=100.0, rope_global_base=5000.0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def randomize_norms(model: torch.nn.Module, std: float = 0.5, seed: int = 0) -> None:
    """Norm weights start at zero; give them values so that tests would notice a (1 + w) mistake."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture
def tokenizer():
    from slm.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture
def tinystories_dir() -> Path:
    if not TINYSTORIES.is_dir():
        pytest.skip(f"shared TinyStories text not found at {TINYSTORIES}")
    return TINYSTORIES
