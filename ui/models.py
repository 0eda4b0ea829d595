"""The model picker: which checkpoints exist, loading them (shared, cached), and each session's choice.

Loaded weights are shared by every session (inference only reads them); what a session has chosen
lives in its own `gr.State`, so two users can look at different models at the same time.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from slm import CheckpointError, LoadedModel, build_model, count_parameters, load, preset
from slm.checkpoint import WEIGHTS_FILE
from slm.engine import warm_up_in_background
from slm.hub import download, is_repo_id
from slm.loading import CheckpointInfo, read_checkpoint_info, scan_checkpoints
from slm.tokenizer import gpt2_tokenizer, has_tokenizer_files

from .common import AppSettings, PathNotAllowed, allowed_path, refuse_in_demo, user_errors

UNTRAINED = "untrained tiny model"
HUB_FOLDER = "hub"  # downloads land in <checkpoints>/hub/<owner>--<name>, so they are checkpoints like any other
log = logging.getLogger("slm.app")

NO_CHECKPOINT_HELP = (
    "**No trained checkpoint in `{root}` yet.** The picker offers an *untrained* `tiny` model, so its text is "
    "random tokens. To get a real one, start a run in the **Train** tab, or run "
    "`python train.py --preset tiny --max-steps 300` (a few minutes on a CPU), then press ↻."
)


MIN_DEFAULT_STEPS = 50  # a run this short is a test, not the model a new visitor should meet first
RUN_ROLES = {"best": 0, "latest": 1}  # the checkpoints a training run writes, in the order the picker lists them


def _fmt_params(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.0f}k"


def role_of(key: str) -> str | None:
    """'best' or 'latest' for a checkpoint a training run wrote, else None."""
    name = key.rsplit("/", 1)[-1]
    return name if name in RUN_ROLES and "/" in key else None


def run_of(key: str) -> str | None:
    """The run folder of a run's best/latest checkpoint ('runs/tiny-1' for 'runs/tiny-1/best'), else None."""
    return key.rsplit("/", 1)[0] if role_of(key) else None


def checkpoint_label(key: str, info: CheckpointInfo) -> str:
    """'tiny-1 · best (step 400, val 2.910, 1.21 bpb) · tiny · 11.8M params': the run once, best and latest told
    apart, with the numbers that say how good it is (bits per byte where the checkpoint records it)."""
    numbers = []
    if info.step is not None:
        numbers.append(f"step {info.step:,}")
    if info.val_loss is not None:
        numbers.append(f"val {info.val_loss:.3f}")
    bpb = info.metadata.get("val_bpb")
    if isinstance(bpb, (int, float)):
        numbers.append(f"{bpb:.2f} bpb")
    role = role_of(key)
    head = f"{run_of(key)} · {role}" if role else key
    if numbers:
        head += f" ({', '.join(numbers)})"
    return " · ".join([head, info.preset or info.format, f"{_fmt_params(info.parameters)} params"])


@dataclass
class ModelEntry:
    """One choice in the picker."""

    key: str  # the dropdown value: a path relative to the checkpoint folder, or UNTRAINED
    label: str
    info: CheckpointInfo | None  # None for the untrained model and for an unreadable folder
    problem: str | None = None  # why a folder with a config.json cannot be used

    def as_dict(self) -> dict:
        info = self.info
        if self.problem is not None:
            return {"key": self.key, "label": self.label, "preset": None, "parameters": None, "step": None,
                    "val_loss": None, "format": "unreadable", "reason": self.problem}
        return {
            "key": self.key,
            "label": self.label,
            "preset": info.preset if info else "tiny",
            "parameters": info.parameters if info else count_parameters(preset("tiny")).total,
            "step": info.step if info else 0,
            "val_loss": info.val_loss if info else None,
            "val_bpb": info.metadata.get("val_bpb") if info else None,
            "run": run_of(self.key),
            "format": info.format if info else "untrained",
        }


class ModelRegistry:
    """Finds checkpoints and keeps the last few loaded models in memory."""

    def __init__(self, settings: AppSettings, max_loaded: int = 3) -> None:
        self.settings = settings
        self.root = settings.checkpoints_dir
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    # ----- what exists --------------------------------------------------------------------------
    def _entry(self, info: CheckpointInfo) -> ModelEntry:
        key = info.path.relative_to(self.root.resolve()).as_posix()
        return ModelEntry(key, checkpoint_label(key, info), info)

    def entries(self) -> list[ModelEntry]:
        """Each run once, newest first, its best checkpoint before its latest; then folders that cannot be
        read (marked, with the reason); then the untrained model (always there, so the app always works)."""
        self.root.mkdir(parents=True, exist_ok=True)
        root = self.root.resolve()
        infos, unreadable = scan_checkpoints(root)
        found = [self._entry(info) for info in infos if self._allowed(info.path)]
        groups: dict[str, list[ModelEntry]] = {}
        for entry in found:  # newest first, so a run's first appearance is its newest checkpoint
            groups.setdefault(run_of(entry.key) or entry.key, []).append(entry)
        by_role = lambda e: RUN_ROLES.get(role_of(e.key), len(RUN_ROLES))  # noqa: E731
        ordered = [e for group in groups.values() for e in sorted(group, key=by_role)]
        bad = []
        for item in unreadable:
            if self._allowed(item.path):
                key = item.path.relative_to(root).as_posix()
                reason = item.reason.replace(str(root) + "/", "")
                bad.append(ModelEntry(key, f"⚠ {key} · unreadable: {reason[:160]}", None, reason))
        untrained = ModelEntry(UNTRAINED, f"{UNTRAINED} · {_fmt_params(count_parameters(preset('tiny')).total)} "
                                          "params · random weights", None)
        return [*ordered, *bad, untrained]

    def _allowed(self, folder: Path) -> bool:
        """False for a folder that only a symlink puts under the checkpoint folder."""
        try:
            allowed_path(folder, self.settings.allowed_roots)
        except PathNotAllowed:
            return False
        return True

    def default_key(self, entries: list[ModelEntry] | None = None) -> str:
        """What a new visitor gets: the configured model (SLM_DEFAULT_MODEL / --default-model) when it
        exists; else the best checkpoint of the most recent run that trained for at least
        MIN_DEFAULT_STEPS steps (a 5-step test run is not a model to greet anyone with); else the newest
        readable one (the untrained model when there is none)."""
        entries = entries if entries is not None else self.entries()
        keys = [e.key for e in entries if e.problem is None]
        configured = (self.settings.default_model or "").strip().strip("/")
        if configured:
            if configured in keys:
                return configured
            log.warning("the default model %r is not in %s; choosing one", configured, self.root)
        for entry in entries:
            if entry.info is None:
                continue
            run = run_of(entry.key)
            group = [e for e in entries if e.info is not None and (run_of(e.key) or e.key) == (run or entry.key)]
            steps = [e.info.step for e in group]
            if any(step is None or step >= MIN_DEFAULT_STEPS for step in steps):  # no step: a converted model
                return group[0].key  # the run's best (entries put it first)
        return usable_key(entries)

    def has_checkpoints(self) -> bool:
        return any(e.info is not None for e in self.entries())

    # ----- loading ------------------------------------------------------------------------------
    def checkpoint_folder(self, key: str) -> Path:
        """The folder a picker value names; it must lie under the checkpoint or data folder."""
        folder = allowed_path(key, self.settings.allowed_roots, base=self.root.resolve())
        if not folder.exists():
            raise CheckpointError(f"There is no checkpoint at {key}. Press ↻ to refresh the list.")
        return folder

    def get(self, key: str | None) -> LoadedModel:
        """The model and its tokenizer for a picker value (None: the default), loaded once and shared."""
        key = key or self.default_key()
        if key == UNTRAINED:
            cache_key: tuple = (UNTRAINED,)
        else:
            folder = self.checkpoint_folder(key)
            weights = folder / WEIGHTS_FILE
            cache_key = (str(folder), weights.stat().st_mtime_ns if weights.exists() else 0)
        with self._lock:
            if cache_key in self._loaded:
                self._loaded.move_to_end(cache_key)
                return self._loaded[cache_key]
            if key == UNTRAINED:
                model = build_model(preset("tiny"), seed=0).to(self.settings.device, self.settings.dtype).eval()
                loaded = LoadedModel(model, gpt2_tokenizer())
            else:
                loaded = load(folder, device=self.settings.device, dtype=self.settings.dtype)
            self._loaded[cache_key] = loaded
            warm_up_in_background(loaded.model)  # compiles the decode step where that is the default (GPU, large CPU)
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return loaded

    def describe(self, key: str | None) -> str:
        """Markdown for the chosen model: what it is, and a warning when it is untrained."""
        key = key or self.default_key()
        if key == UNTRAINED:
            text = f"**{UNTRAINED}**: the `tiny` preset, freshly initialised (seed 0). Its output is random."
            if not self.has_checkpoints():
                text += "\n\n" + NO_CHECKPOINT_HELP.format(root=self.root)
            return text
        try:
            info = read_checkpoint_info(self.checkpoint_folder(key))
        except (CheckpointError, PathNotAllowed) as exc:
            return f"**{key}** cannot be used: {exc}"
        config = info.config
        bpb = info.metadata.get("val_bpb")
        parts = [
            f"**{key}**", f"preset `{info.preset or '-'}`", f"{_fmt_params(info.parameters)} parameters",
            f"{config.num_layers} layers, width {config.hidden_size}, context {config.context_length}",
            f"{config.vocab_size:,}-token vocabulary ({tokenizer_name(info.path)})",
            f"step {info.step if info.step is not None else '-'}",
            f"val loss {f'{info.val_loss:.3f}' if info.val_loss is not None else '-'}",
            *([f"{bpb:.2f} bits per byte"] if isinstance(bpb, (int, float)) else []),
            f"running on {self.settings.device.type} ({str(self.settings.dtype).removeprefix('torch.')})",
        ]
        return " · ".join(parts)

    # ----- the hub ------------------------------------------------------------------------------
    def download_from_hub(self, repo_id: str) -> str:
        """Download a transformers Gemma 3 checkpoint into the checkpoint folder; return its picker value."""
        repo_id = (repo_id or "").strip()
        if not is_repo_id(repo_id):
            raise ValueError(f"{repo_id!r} is not a Hub repository id; it looks like 'owner/name'.")
        target = self.root / HUB_FOLDER / repo_id.replace("/", "--")
        download(repo_id, target)  # config, safetensors and tokenizer files; a clear message when gated
        info = read_checkpoint_info(target)  # refuses a folder without safetensors weights
        return info.path.relative_to(self.root.resolve()).as_posix()


def tokenizer_name(folder: Path) -> str:
    return "its own tokenizer.json" if has_tokenizer_files(folder) else "GPT-2 tokenizer"


def usable_key(entries: list[ModelEntry]) -> str:
    """The first entry that can be loaded (the untrained model is always one)."""
    return next(e.key for e in entries if e.problem is None)


def checkpoint_table(entries: list[ModelEntry], default: str) -> list[dict]:
    """What the `list_checkpoints` API returns; `default` marks the model a new visitor gets."""
    return [{**e.as_dict(), "default": e.key == default} for e in entries]


class ModelPicker:
    """The picker row above the tabs; `state` holds this session's choice (None: the default)."""

    def __init__(self, registry: ModelRegistry, heading: str | None = None) -> None:
        self.registry = registry
        entries = registry.entries()
        default = registry.default_key(entries)
        if heading:
            gr.Markdown(heading, elem_classes=["app-title"])
        with gr.Row(equal_height=True, elem_classes=["picker-row"]):
            self.dropdown = gr.Dropdown(
                choices=[(e.label, e.key) for e in entries], value=default, label="Model", container=False,
                allow_custom_value=True, scale=6, elem_id="model-picker",
            )
            self.hub_repo = gr.Textbox(label="Hub repo", placeholder="…or a Hub repo id (transformers Gemma 3)",
                                       container=False, scale=3, elem_id="hub-repo")
            self.hub_button = gr.Button("Download", size="sm", scale=0, min_width=110, elem_id="hub-download")
            self.refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=110, elem_id="model-refresh")
        self.description = gr.Markdown(registry.describe(default), elem_id="model-description")
        self.catalogue = gr.JSON(visible=False, label="checkpoints")
        self.state = gr.State(None)

    def wire(self) -> None:
        registry = self.registry

        @user_errors
        def list_all() -> list[dict]:
            entries = registry.entries()
            return checkpoint_table(entries, registry.default_key(entries))

        def show_choices(current: str | None):
            entries = registry.entries()
            keys = [e.key for e in entries]
            value = current if current in keys else registry.default_key(entries)
            return gr.Dropdown(choices=[(e.label, e.key) for e in entries], value=value)

        @user_errors
        def select(model: str | None):
            if not model:
                raise gr.Error("Choose a model first.")
            registry.get(model)  # load now: a broken checkpoint is reported here, not at the first use
            return model, registry.describe(model)

        @user_errors
        def from_hub(repo_id: str):
            refuse_in_demo(registry.settings, "downloading models from the Hugging Face Hub")
            key = registry.download_from_hub(repo_id)
            registry.get(key)
            return key, registry.describe(key)

        self.refresh.click(list_all, None, self.catalogue, api_name="list_checkpoints").then(
            show_choices, self.state, self.dropdown, api_visibility="private"
        )
        self.dropdown.input(select, self.dropdown, [self.state, self.description], api_name="select_model")
        self.hub_button.click(from_hub, self.hub_repo, [self.state, self.description], api_name="load_hub").success(
            show_choices, self.state, self.dropdown, api_visibility="private"
        )
