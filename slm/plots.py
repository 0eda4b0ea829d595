"""matplotlib figures drawn from plain data (metrics records, probabilities, attention maps).

Figures are built with `matplotlib.figure.Figure` and the Agg canvas, never through pyplot's global
figure registry, so a long-running server does not accumulate figures; callers close what they get
(`plt.close(fig)` is harmless, dropping the reference is enough).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, ScalarFormatter


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


def loss_figure(metrics: Iterable[dict[str, Any]], x: str = "tokens", title: str | None = None) -> Figure:
    """Train and validation loss against tokens seen (or `x="step"`), log-scaled loss axis."""
    if x not in ("tokens", "step"):
        raise ValueError(f"x must be 'tokens' or 'step', got {x!r}")
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
