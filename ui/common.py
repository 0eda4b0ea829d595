"""What every tab shares: the app's settings, the folder guard, input checks and error reporting.

Every handler goes through `user_errors`: a problem the user can fix becomes a `gr.Error` with a
message saying what to do, anything else is logged with its traceback on the server and answered
with a one-line message. The server never dies of a bad request and never shows a traceback.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from slm import CheckpointError
from slm.devices import native_bf16
from slm.limits import DEFAULT_MAX_UPLOAD_MB, fit_prompt
from slm.paths import PathNotAllowed, inside

log = logging.getLogger("slm.app")


@dataclass
class AppSettings:
    """Where the app reads and writes, and where its models run."""

    checkpoints_dir: Path
    data_dir: Path
    device: torch.device
    dtype: torch.dtype
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB  # the largest training-text upload accepted
    default_model: str | None = None  # the picker value a new visitor gets (None: the best recent checkpoint)
    demo: bool = False  # a public demo: training, uploads and Hub downloads are off
    zero_gpu: bool = False  # a ZeroGPU Space: the GPU is lent per request (no training, no torch.compile)

    @property
    def allowed_roots(self) -> list[Path]:
        return [self.checkpoints_dir.resolve(), self.data_dir.resolve()]


DEMO_REFUSAL = (
    "This playground runs as a public demo (SLM_DEMO=1): {what} is switched off here. Generation, step by "
    "step, tokens and inspection work for everyone. To train, run it yourself: `python app.py` on your own "
    "machine, or duplicate this Space and leave SLM_DEMO unset."
)
ZERO_GPU_REFUSAL = (
    "This Space runs on ZeroGPU, which lends a GPU to one request for seconds at a time, so a training run "
    "cannot have one. Train on your own machine (`python train.py`), or on a Space with dedicated GPU hardware "
    "(or a GPU notebook), push the checkpoint to the Hub and load it here by repo id."
)


def on_zero_gpu() -> bool:
    """True on a Hugging Face ZeroGPU Space (it sets SPACES_ZERO_GPU and provides the `spaces` package)."""
    return bool(os.environ.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


def refuse_in_demo(settings: AppSettings, what: str) -> None:
    """A gr.Error saying that `what` is off in a public demo (nothing happens otherwise)."""
    if settings.demo:
        raise gr.Error(DEMO_REFUSAL.format(what=what))


def pick_device(requested: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA when present (bf16 where the GPU supports it, else fp32); otherwise the CPU in fp32."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU is available on this machine")
    # not emulated bf16 (T4, V100): slower than fp32 there; a CPU keeps fp32, whose probabilities the tabs show
    if device.type == "cuda" and native_bf16(device):
        return device, torch.bfloat16
    return device, torch.float32


def allowed_path(path: str | Path, roots: list[Path], base: Path | None = None) -> Path:
    """`path` resolved (symlinks followed), if it lies inside one of `roots`; else PathNotAllowed.

    A relative path is taken relative to `base` (default: the first root). The rule itself lives in
    `slm.paths.inside`, shared with the training worker.
    """
    return inside(path, roots, base)


def prompt_ids(tokenizer: Any, prompt: str, max_tokens: int) -> list[int]:
    """The prompt's token ids, at most `max_tokens` of them (the last ones), with a notice when it was trimmed.

    Every tab that feeds a typed prompt to a model goes through this (the policy is `slm.limits.fit_prompt`).
    """
    fitted = fit_prompt(tokenizer, prompt or "", max_tokens)
    if fitted.notice:
        gr.Warning(fitted.notice)
    return fitted.ids


def number(value: Any, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """A finite number within bounds, or a gr.Error that names the setting."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}.") from None
    if math.isnan(value) or math.isinf(value):
        raise gr.Error(f"{name} must be a finite number, got {value}.")
    if minimum is not None and value < minimum:
        raise gr.Error(f"{name} must be at least {minimum:g}, got {value:g}.")
    if maximum is not None and value > maximum:
        raise gr.Error(f"{name} must be at most {maximum:g}, got {value:g}.")
    return value


def integer(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    value = number(value, name, minimum, maximum)
    if not value.is_integer():
        raise gr.Error(f"{name} must be a whole number, got {value:g}.")
    return int(value)


EXPECTED = (ValueError, CheckpointError, FileNotFoundError, FileExistsError, PathNotAllowed)


def _as_user_error(exc: Exception) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, EXPECTED):
        return gr.Error(str(exc))
    log.exception("unexpected error in a request")
    return gr.Error(f"Something went wrong ({type(exc).__name__}: {exc}). The server is still running.")


def user_errors(fn: Callable) -> Callable:
    """Turn exceptions into gr.Error messages (works for plain functions and generators)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise _as_user_error(exc) from None

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _as_user_error(exc) from None

    return wrapper


def _no_gpu(fn: Callable | None = None, **_: Any) -> Callable:
    return fn if fn is not None else (lambda f: f)


try:  # On a Hugging Face ZeroGPU Space the `spaces` package lends a GPU to decorated calls.
    import spaces

    gpu = spaces.GPU
except ImportError:  # everywhere else: a no-op
    gpu = _no_gpu
