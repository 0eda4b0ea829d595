"""matplotlib figures drawn from plain data: metrics records (loss curves) and `slm.inspection`
results (probabilities, attention maps, logit lens), sized to be read on a projector.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas, never through pyplot: pyplot
keeps a global registry of open figures that is not thread-safe and leaks unless every figure is
closed, while these are plain objects that the garbage collector frees once the caller (a web
server's `gr.Plot`, a file writer) drops them; `plt.close(fig)` is harmless but not needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, PercentFormatter, ScalarFormatter

from .inspection import LensRow, NextTokenView, SamplingView

FONT = 14  # base font size: readable from the back of a lecture room
SMALL = 12
UNREACHABLE = "#d9d9d9"  # attention cells a query cannot see (future, or outside the sliding window)
CMAP = "Blues"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def loss_curves(metrics: Iterable[dict[str, Any]], x: str = "tokens") -> dict[str, tuple[list[float], list[float]]]:
    """(x values, losses) of the train and validation curves from metrics records."""
    curves: dict[str, tuple[list[float], list[float]]] = {"train": ([], []), "val": ([], [])}
    for record in metrics:
        if record.get("kind", "train") != "train" or x not in record:
            continue
        for name in ("train", "val"):
            value = record.get(f"{name}_loss")
            if value is not None:
                curves[name][0].append(record[x])
                curves[name][1].append(value)
    return curves


def bits_per_byte_ratio(metrics: list[dict[str, Any]]) -> float | None:
    """Bits per byte per nat of validation loss (the text's bytes per token, in bits), from the newest record."""
    for record in reversed(metrics):
        if record.get("val_bpb") is not None and record.get("val_loss"):
            return record["val_bpb"] / record["val_loss"]
    return None


def loss_figure(metrics: Iterable[dict[str, Any]], x: str = "tokens", title: str | None = None) -> Figure:
    """Train and validation loss against tokens seen (or `x="step"`), log-scaled loss axis."""
    if x not in ("tokens", "step"):
        raise ValueError(f"x must be 'tokens' or 'step', got {x!r}")
    metrics = list(metrics)
    curves = loss_curves(metrics, x)
    figure = _new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    train_x, train_y = curves["train"]
    val_x, val_y = curves["val"]
    if not train_y and not val_y:
        axes.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return figure
    if train_y:
        axes.plot(train_x, train_y, color="tab:blue", linewidth=1.2, label="train")
    if val_y:
        axes.plot(val_x, val_y, color="tab:orange", marker="o", markersize=3, linewidth=1.5, label="validation")
        best = min(range(len(val_y)), key=val_y.__getitem__)
        axes.annotate(f"best {val_y[best]:.3f}", (val_x[best], val_y[best]), textcoords="offset points",
                      xytext=(0, 8), ha="center", va="bottom", fontsize=8, color="tab:orange")
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(ScalarFormatter())
    axes.tick_params(axis="y", which="minor", labelsize=7)
    if x == "tokens":
        axes.xaxis.set_major_formatter(EngFormatter())
    axes.set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
    axes.set_ylabel("cross-entropy loss (nats)")
    ratio = bits_per_byte_ratio(metrics)
    if ratio is not None:  # the same curves read in bits per UTF-8 byte of validation text
        right = axes.secondary_yaxis("right", functions=(lambda y: y * ratio, lambda b: b / ratio))
        right.set_ylabel("validation bits per byte")
        right.yaxis.set_major_formatter(ScalarFormatter())  # "3", not a log axis's "3 x 10^0"
        right.yaxis.set_minor_formatter(ScalarFormatter())
        right.tick_params(axis="y", which="minor", labelsize=7)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    return figure


LOSS_PLOT_FILE = "loss.png"


def save_loss_plot(metrics: Iterable[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Write the loss figure to a PNG (through a temporary file, so a reader never sees half an image)."""
    path = Path(path)
    figure = loss_figure(metrics, title=title)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def write_run_loss_plot(run_dir: str | Path, metrics: Iterable[dict[str, Any]]) -> Path:
    """`<run_dir>/loss.png` from the run's metrics records."""
    run_dir = Path(run_dir)
    return save_loss_plot(metrics, run_dir / LOSS_PLOT_FILE, title=run_dir.name)


# ----- inspection figures -----------------------------------------------------------------------
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
    fig = _new_figure(7.5, 7.2)
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
    fig = _new_figure(7.5, 3.4 * rows + 1.4)
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
    fig = _new_figure(7.5, 0.42 * len(view.candidates) + 1.9)
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
    fig = _new_figure(13, 0.45 * len(labels) + 2.2)
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
    fig = _new_figure(7.5, 0.5 * depth_count + 1.4)
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


# ----- watching a run learn ---------------------------------------------------------------------
def learning_figure(
    steps: Sequence[int], text_losses: Sequence[float], metrics: Iterable[dict[str, Any]], current_step: int | None,
    text_label: str = "this text",
) -> Figure:
    """The text's loss at each snapshot beside the run's training curve, the current snapshot marked.

    Both against the optimizer step on a symmetric-log axis, so that the dense early snapshots
    (0, 10, 20, 50, ...) are as far apart as the late ones.
    """
    figure = _new_figure(11.0, 3.6)
    left, right = figure.subplots(1, 2, sharex=True)
    left.plot(steps, text_losses, color="tab:red", marker="o", markersize=4, linewidth=1.5)
    left.set_title(f"{text_label}: loss at each snapshot", fontsize=SMALL)
    curves = loss_curves(metrics, x="step")
    for name, color in (("train", "tab:blue"), ("val", "tab:orange")):
        xs, ys = curves[name]
        if ys:
            right.plot(xs, ys, color=color, linewidth=1.2, marker="o" if name == "val" else None, markersize=3,
                       label="train" if name == "train" else "validation")
    if curves["train"][1] or curves["val"][1]:
        right.legend(fontsize=SMALL)
    right.set_title("the run's training curve", fontsize=SMALL)
    for axes in (left, right):
        axes.set_xscale("symlog", linthresh=10)
        axes.xaxis.set_major_formatter(EngFormatter())
        axes.set_xlabel("optimizer step", fontsize=SMALL)
        axes.set_ylabel("loss (nats)", fontsize=SMALL)
        axes.grid(True, alpha=0.3)
        if current_step is not None:
            axes.axvline(current_step, color="black", linestyle="--", linewidth=1.2)
    if current_step is not None and current_step in steps:
        i = list(steps).index(current_step)
        left.plot([current_step], [text_losses[i]], marker="o", markersize=11, markerfacecolor="none",
                  markeredgecolor="black", markeredgewidth=2)
        left.annotate(f"step {current_step:,}: {text_losses[i]:.2f}", (current_step, text_losses[i]),
                      textcoords="offset points", xytext=(8, 8), fontsize=SMALL)
    return figure
