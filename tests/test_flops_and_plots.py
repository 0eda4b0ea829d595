"""FLOP accounting against a measured count, the device peak table, and the loss figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from slm.config import preset
from slm.flops import (
    attention_flops_per_token,
    device_peak_flops,
    matmul_parameters,
    mean_keys_attended,
    mfu,
    peak_flops_for_name,
    training_flops_per_token,
)
from slm.masks import sliding_causal_mask
from slm.model import build_model
from slm.plots import loss_figure, save_loss_plot


def test_matmul_flops_match_what_torch_counts_for_a_training_step() -> None:
    config = preset("tiny", context_length=64, num_layers=2)
    model = build_model(config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model.loss(tokens, tokens).backward()
    counts = counter.get_flop_counts()["Global"]
    measured = (counts[torch.ops.aten.mm] + counts.get(torch.ops.aten.addmm, 0)) / tokens.numel()
    predicted = 6 * matmul_parameters(config)
    # the only difference: the head's three GEMMs (the forward logits and both gradients) also cover the 47
    # padding rows of the vocabulary, which the fused loss masks rather than slices (aligned GEMMs)
    padding = 6 * (model.padded_vocab_size - config.vocab_size) * config.hidden_size
    assert measured == predicted + padding


@pytest.mark.parametrize(("seq_len", "window"), [(64, None), (64, 16), (64, 64), (10, 16), (100, 1)])
def test_mean_keys_attended_counts_the_model_own_mask(seq_len: int, window: int | None) -> None:
    mask = sliding_causal_mask(seq_len, window, torch.device("cpu"))
    assert mean_keys_attended(seq_len, window) == pytest.approx(mask.sum().item() / seq_len)


def test_sliding_layers_cost_less_attention_only_when_the_window_binds() -> None:
    full = preset("gemma3-270m", sliding_window_pattern=1)  # every layer global
    mixed = preset("gemma3-270m")
    assert attention_flops_per_token(mixed, 1024) < attention_flops_per_token(full, 1024)
    assert attention_flops_per_token(mixed, 512) == attention_flops_per_token(full, 512)
    per_layer_global = 12 * 4 * 256 * (1024 + 1) / 2
    assert attention_flops_per_token(full, 1024) == pytest.approx(18 * per_layer_global)
    assert training_flops_per_token(mixed) == 6 * matmul_parameters(mixed) + attention_flops_per_token(mixed, 1024)


def test_peak_table_knows_common_gpus_and_nothing_else() -> None:
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_name("NVIDIA H200") == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_name("NVIDIA L4") == 121e12
    assert peak_flops_for_name("NVIDIA L40S") == 362e12
    assert peak_flops_for_name("Tesla T4") == 65e12
    assert peak_flops_for_name("NVIDIA A10G") is None and peak_flops_for_name("NVIDIA GeForce RTX 3060") is None
    assert device_peak_flops("cpu") is None
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1e5, 1e9, 1e15, world_size=2) == pytest.approx(0.05)


RECORDS = [
    {"kind": "preparing", "step": 0},
    {"kind": "train", "step": 1, "tokens": 100, "train_loss": 10.8, "val_loss": None},
    {"kind": "train", "step": 2, "tokens": 200, "train_loss": 8.0, "val_loss": 7.5},
    {"kind": "sample", "step": 2, "text": "Once upon a time"},
    {"kind": "train", "step": 3, "tokens": 300, "train_loss": 6.0, "val_loss": None},
    {"kind": "train", "step": 4, "tokens": 400, "train_loss": 5.0, "val_loss": 5.2},
]


def test_loss_figure_draws_train_and_validation_curves_without_pyplot_state() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figure = loss_figure(RECORDS)
    axes = figure.axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines["train"].get_xdata()) == [100, 200, 300, 400]
    assert list(lines["train"].get_ydata()) == [10.8, 8.0, 6.0, 5.0]
    assert list(lines["validation"].get_xdata()) == [200, 400]
    assert list(lines["validation"].get_ydata()) == [7.5, 5.2]
    by_step = loss_figure(RECORDS, x="step").axes[0]
    assert list(by_step.get_lines()[0].get_xdata()) == [1, 2, 3, 4] and by_step.get_xlabel() == "optimizer step"
    assert plt.get_fignums() == before  # nothing registered with pyplot, nothing leaks
    plt.close(figure)  # what a caller does; harmless


def test_an_empty_run_gets_a_figure_that_says_so_and_plots_are_written_as_png(tmp_path: Path) -> None:
    empty = loss_figure([{"kind": "preparing", "step": 0}])
    assert any("no losses" in text.get_text() for text in empty.axes[0].texts)
    path = save_loss_plot(RECORDS, tmp_path / "loss.png", title="run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="tokens"):
        loss_figure(RECORDS, x="time")
