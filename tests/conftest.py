"""Shared fixtures: a small real model (built and saved in milliseconds) and the real tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

from slm import ModelConfig, build_model, load_tokenizer

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def small_config(**overrides) -> ModelConfig:
    """Three layers (sliding, sliding, global) with a window of 4, so sliding attention binds on short texts.

    A large init_std makes the untrained model's predictions peaked rather than uniform, so tests
    that compare probabilities compare numbers that differ from token to token.
    """
    values = dict(
        context_length=64, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16,
        intermediate_size=64, sliding_window=4, sliding_window_pattern=3, init_std=0.3,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def small_model():
    torch.manual_seed(0)
    return build_model(small_config(), device="cpu", dtype=torch.float32, seed=0).eval()
