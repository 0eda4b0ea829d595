"""Builds transformers' Gemma3ForCausalLM with our model's config and weights (test-only dependency)."""

from __future__ import annotations

import pytest
import torch

from slm.hf import config_to_hf, state_to_hf
from slm.model import Gemma3LM

transformers = pytest.importorskip("transformers")


def reference_model(model: Gemma3LM, attn_implementation: str = "eager"):
    fields = {k: v for k, v in config_to_hf(model.config).items() if k not in ("architectures", "torch_dtype", "dtype")}
    hf_config = transformers.Gemma3TextConfig(**fields)
    hf_config._attn_implementation = attn_implementation
    reference = transformers.Gemma3ForCausalLM(hf_config)
    result = reference.load_state_dict(state_to_hf(model.export_state_dict(), model.config), strict=False)
    expected_missing = ["lm_head.weight"] if model.config.tie_embeddings else []
    assert sorted(result.missing_keys) == expected_missing and not result.unexpected_keys, result
    reference.tie_weights()
    return reference.eval()


@torch.no_grad()
def reference_logits(reference, input_ids: torch.Tensor) -> torch.Tensor:
    return reference(input_ids).logits
