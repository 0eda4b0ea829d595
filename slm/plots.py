"""matplotlib figures drawn from `slm.inspection` data, sized to be read on a projector.

Figures are built with the object-oriented API (`Figure` + the Agg canvas), never through pyplot:
pyplot keeps a global registry of open figures that is not thread-safe and leaks unless every
figure is closed, while these are plain objects that the garbage collector frees once the caller
(for example a `gr.Plot`) has rendered them.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .inspection import LensRow, NextTokenView, SamplingView

FONT = 14  # base font size: readable from the back of a lecture room
SMALL = 12
UNREACHABLE = "#d9d9d9"  # attention cells a query cannot see (future, or outside the sliding window)
CMAP = "Blues"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def visible(token: str) -> str:
    """A token as a label: spaces, newlines and tabs made visible; `$` escaped so matplotlib shows it as is."""
    return token.replace("\\", "\\\\").replace("$", r"\$").replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def percent(probability: float) -> str:
    """A probability as a percentage with enough digits that small ones do not read as 0%."""
    value = 100 * probability
    if value == 0:
        return "0%"
    if value >= 1:
        return f"{value:.1f}%"
    if value >= 0.01:
        return f"{value:.2f}%"
    return f"{value:.1g}%"


def _tick_positions(count: int, max_labels: int) -> np.ndarray:
    step = max(1, int(np.ceil(count / max_labels)))
    return np.arange(0, count, step)


def _visible_keys(length: int, window: int | None) -> np.ndarray:
    """Boolean (T, T): which keys each query can attend to (causal, within the window if any)."""
    q = np.arange(length)[:, None]
    k = np.arange(length)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    return allowed


def _draw_attention(ax, weights: np.ndarray, window: int | None, norm: PowerNorm):
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad=UNREACHABLE)
    shown = np.ma.masked_where(~_visible_keys(weights.shape[0], window), weights)
    return ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")


def _attention_kind(window: int | None) -> str:
    if window is None:
        return "global: sees every earlier token"
    return f"sliding window of {window} tokens (grey: out of reach)"


def attention_heatmap(
    weights: np.ndarray, tokens: Sequence[str], layer_label: str, head: int, window: int | None = None,
    max_labels: int = 40,
) -> Figure:
    """One head's attention (T, T): rows are the tokens attending (queries), columns the tokens attended to."""
    weights = np.asarray(weights, dtype=np.float32)
    length = weights.shape[0]
    fig = _figure(7.5, 7.2)
    ax = fig.add_subplot()
    image = _draw_attention(ax, weights, window, PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0))
    ticks = _tick_positions(length, max_labels)
    labels = [visible(tokens[i]) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=SMALL)
    ax.set_yticks(ticks, labels, fontsize=SMALL)
    ax.set_xlabel("attended-to token (key)", fontsize=FONT)
    ax.set_ylabel("attending token (query)", fontsize=FONT)
    ax.set_title(f"{layer_label}, head {head}\n{_attention_kind(window)}", fontsize=FONT)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("attention weight", fontsize=FONT)
    bar.ax.tick_params(labelsize=SMALL)
    return fig


def attention_grid(
    maps: np.ndarray, tokens: Sequence[str], layer_label: str, window: int | None = None, max_labels: int = 16
) -> Figure:
    """Every head of one layer side by side (maps: (heads, T, T)), on one shared colour scale."""
    maps = np.asarray(maps, dtype=np.float32)
    heads, length = maps.shape[0], maps.shape[1]
    cols = min(heads, 2) if heads <= 4 else 4
    rows = int(np.ceil(heads / cols))
    fig = _figure(7.5, 3.4 * rows + 1.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    ticks = _tick_positions(length, max_labels)
    labels = [visible(tokens[i]) for i in ticks]
    image = None
    for h, ax in enumerate(axes):
        if h >= heads:
            ax.set_axis_off()
            continue
        image = _draw_attention(ax, maps[h], window, norm)
        ax.set_title(f"head {h}", fontsize=FONT)
        ax.set_xticks(ticks, labels, rotation=90, fontsize=9)
        ax.set_yticks(ticks, labels if h % cols == 0 else [], fontsize=9)
    fig.suptitle(f"{layer_label}: all {heads} heads\n{_attention_kind(window)}", fontsize=FONT)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.7)
        bar.set_label("attention weight", fontsize=SMALL)
    return fig


def _bars(
    ax, labels: Sequence[str], values: Sequence[float], color: str, cut: Sequence[bool] | None = None,
    xmax: float | None = None,
) -> None:
    """Horizontal bars, most likely at the top, each labelled with its percentage."""
    y = np.arange(len(labels))
    colors = [UNREACHABLE if cut and cut[i] else color for i in range(len(labels))]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, [visible(t) for t in labels], fontsize=FONT)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # most likely at the top
    ax.set_xlim(0, 1.25 * (xmax or max(max(values, default=0.0), 1e-6)))
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))
    ax.tick_params(axis="x", labelsize=SMALL)
    for i, v in enumerate(values):
        text = "cut" if cut and cut[i] else percent(v)
        ax.text(v, i, f" {text}", va="center", fontsize=SMALL)
    ax.spines[["top", "right"]].set_visible(False)


def next_token_bars(view: NextTokenView, after_token: str) -> Figure:
    """The top next-token candidates after one position, with the distribution's entropy."""
    fig = _figure(7.5, 0.42 * len(view.candidates) + 1.9)
    ax = fig.add_subplot()
    _bars(ax, [c.text for c in view.candidates], [c.probability for c in view.candidates], "#3b75af")
    ax.set_xlabel("probability", fontsize=FONT)
    ax.set_title(
        f"next token after “{visible(after_token)}” (position {view.position})\n"
        f"entropy {view.entropy:.2f} nats ≈ {view.effective_choices:.1f} equally likely choices",
        fontsize=FONT,
    )
    return fig


def describe_settings(temperature: float, top_k: int | None, top_p: float | None) -> str:
    """'temperature 0.8, top-k 50, top-p 0.9' (or 'greedy'), as the sampling bar chart titles it."""
    if temperature <= 0:
        return "greedy (temperature 0)"
    parts = [f"temperature {temperature:g}"]
    if top_k:
        parts.append(f"top-k {int(top_k)}")
    if top_p is not None and top_p < 1:
        parts.append(f"top-p {top_p:g}")
    return ", ".join(parts)


def sampling_bars(view: SamplingView) -> Figure:
    """The model's next-token distribution beside the one the sampler draws from."""
    labels = [c.text for c in view.candidates]
    fig = _figure(13, 0.45 * len(labels) + 2.2)
    left, right = fig.subplots(1, 2)
    before = [c.probability for c in view.candidates]
    after = [c.sampling_probability for c in view.candidates]
    xmax = max([*before, *after, 1e-6])  # one scale, so sharpening by temperature or filtering shows as growth
    _bars(left, labels, before, "#3b75af", xmax=xmax)
    left.set_title(f"model (temperature 1)\nentropy {view.entropy:.2f} nats", fontsize=FONT)
    left.set_xlabel("probability", fontsize=FONT)
    cut = [c.sampling_probability == 0 for c in view.candidates]
    _bars(right, labels, after, "#d9822b", cut, xmax=xmax)
    right.set_title(
        f"sampler: {describe_settings(view.temperature, view.top_k, view.top_p)}\n"
        f"{view.tokens_kept:,} tokens can still be drawn, entropy {view.sampling_entropy:.2f} nats",
        fontsize=FONT,
    )
    right.set_xlabel("probability", fontsize=FONT)
    right.tick_params(axis="y", labelleft=False)
    return fig


def logit_lens_figure(rows: Sequence[LensRow], position: int, token: str) -> Figure:
    """A table: one row per depth, the most likely next tokens at that depth, shaded by probability."""
    depth_count = len(rows)
    k = max(len(r.candidates) for r in rows)
    probs = np.array([[c.probability for c in r.candidates] + [0.0] * (k - len(r.candidates)) for r in rows])
    fig = _figure(7.5, 0.5 * depth_count + 1.4)
    ax = fig.add_subplot()
    ax.imshow(probs, cmap=CMAP, vmin=0.0, vmax=1.0, aspect="auto")
    for d, row in enumerate(rows):
        for j, cand in enumerate(row.candidates):
            dark = cand.probability > 0.55
            ax.text(
                j, d, f"{visible(cand.text)}  {percent(cand.probability)}", ha="center", va="center",
                fontsize=SMALL, color="white" if dark else "black",
            )
    labels = [r.label for r in rows]
    labels[-1] += " = output"
    ax.set_yticks(range(depth_count), labels, fontsize=SMALL)
    ax.set_xticks(range(k), [f"#{j + 1}" for j in range(k)], fontsize=SMALL)
    ax.xaxis.set_ticks_position("top")
    ax.set_title(f"logit lens after “{visible(token)}” (position {position})\nthe prediction read out at each depth",
                 fontsize=FONT)
    return fig
