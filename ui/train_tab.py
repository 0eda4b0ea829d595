"""Train tab: start, stop and resume a background training run, and watch it live.

The run belongs to the server's one `TrainingManager` (a subprocess), not to a browser session:
closing the tab does not stop it, and a reloaded page re-attaches through the polling timer.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from pathlib import Path
from typing import Any

import gradio as gr

from slm import PRESETS
from slm.data import DEFAULT_DATASET
from slm.hub import is_repo_id
from slm.jobs import JobStatus, TrainingBusyError, TrainingManager
from slm.paths import create_new_file, inside
from slm.plots import loss_figure
from slm.train_config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, RUN_CONFIG_FILE, TrainConfig
from slm.training import SAMPLES_FILE, read_metrics

from .common import ZERO_GPU_REFUSAL, AppSettings, allowed_path, integer, number, refuse_in_demo, user_errors
from .inspect_tab import DEFAULT_TEXT as WATCH_TEXT
from .models import ModelPicker
from .watch_tab import newest_snapshot_view

HUB_SOURCE = "TinyStories from the Hugging Face hub"
FILE_SOURCE = "A file in the data folder"
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
UPLOADS = "uploads"
POLL_SECONDS = 1.5
ACTIVE = ("preparing", "running", "stopping")


def data_files(data_dir: Path) -> list[str]:
    """Training text files under the data folder, as paths relative to it."""
    if not data_dir.is_dir():
        return []
    return sorted(
        p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(data_dir).parts)
    )


def resumable_runs(checkpoints_dir: Path) -> list[str]:
    """Run folders whose `latest/` checkpoint holds a training state, newest first."""
    if not checkpoints_dir.is_dir():
        return []
    runs = [p.parent.parent for p in checkpoints_dir.rglob("latest/training_state.json")]
    runs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.relative_to(checkpoints_dir).as_posix() for p in runs]


def last_run(checkpoints_dir: Path) -> Path | None:
    """The most recently written run folder (one with a run.json), or None."""
    if not checkpoints_dir.is_dir():
        return None
    found = [p.parent for p in checkpoints_dir.rglob(RUN_CONFIG_FILE)]
    return max(found, key=lambda p: (p / RUN_CONFIG_FILE).stat().st_mtime, default=None)


def run_settings(run_dir: Path) -> TrainConfig | None:
    """A run's own settings (its run.json, every default resolved), or None when unreadable."""
    try:
        return TrainConfig.load(run_dir / RUN_CONFIG_FILE)
    except (OSError, ValueError, TypeError):
        return None


def live_point(metrics: list[dict[str, Any]], status: dict[str, Any]) -> list[dict[str, Any]]:
    """The heartbeat's step and running loss as one more point on the loss curve, when it is past the last record."""
    logged = max((r.get("step", 0) for r in metrics if r.get("kind") == "train"), default=0)
    if status.get("state") not in ACTIVE or status.get("train_loss") is None or (status.get("step") or 0) <= logged:
        return []
    return [{"kind": "train", "step": status["step"], "tokens": status.get("tokens", 0),
             "train_loss": status["train_loss"]}]


def status_dict(status: JobStatus) -> dict[str, Any]:
    data = dataclasses.asdict(status) if dataclasses.is_dataclass(status) else dict(vars(status))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def status_markdown(s: dict[str, Any]) -> str:
    """One readable block: state, progress, speed, losses, time, device."""
    state = s.get("state", "idle")
    if state == "idle":
        return "**No training run yet.** Choose the settings and press **Start**."
    parts = [f"**{state}**"]
    if s.get("run_dir"):
        parts.append(f"run `{Path(s['run_dir']).name}`")
    if s.get("max_steps"):
        parts.append(f"step {s.get('step') or 0:,} / {s['max_steps']:,}")
    if s.get("tokens"):
        parts.append(f"{s['tokens']:,} tokens")
    line = " · ".join(parts)
    numbers = []
    if s.get("train_loss") is not None:
        numbers.append(f"train loss {s['train_loss']:.3f}")
    if s.get("val_loss") is not None:
        numbers.append(f"val loss {s['val_loss']:.3f}")
    if s.get("val_bpb") is not None:
        numbers.append(f"{s['val_bpb']:.3f} bits/byte")
    if s.get("tokens_per_s"):
        numbers.append(f"{s['tokens_per_s']:,.0f} tokens/s")
    if s.get("mfu") is not None:  # known only on GPUs with a known peak
        numbers.append(f"MFU {100 * s['mfu']:.1f}%")
    numbers.append(f"elapsed {_duration(s.get('elapsed_s'))}"
                   + (f" of {_duration(s['max_time'])}" if s.get("max_time") else ""))
    if state in ACTIVE:
        numbers.append(f"ETA {_duration(s.get('eta_s'))}")
    if s.get("device"):
        numbers.append(f"on {s['device']}")
    text = line + "  \n" + " · ".join(numbers)
    if s.get("message"):
        text += f"  \n{s['message']}"
    return text


def run_extras(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """The run's time budget and its newest validation bits per byte, from its metrics records."""
    extras: dict[str, float] = {}
    for record in metrics:
        if record.get("kind") == "start" and record.get("max_time"):
            extras["max_time"] = record["max_time"]
        if record.get("kind") == "train" and record.get("val_bpb") is not None:
            extras["val_bpb"] = record["val_bpb"]
    return extras


def samples_text(run_dir: str | None) -> str:
    """The newest evaluation's samples (greedy and sampled, per prompt), headed by the step they come from."""
    records = read_metrics(run_dir, SAMPLES_FILE) if run_dir else []
    if not records:
        return ""
    step = records[-1]["step"]
    latest = [r for r in records if r.get("step") == step]
    lines = [f"Step {step:,} ({latest[0].get('tokens', 0):,} tokens)"]
    lines += [f"\n[{r.get('mode')}] {r.get('text', '')}" for r in latest]
    return "\n".join(lines)


def safe_upload_name(name: str) -> str:
    stem = re.sub(r"[^\w.-]+", "_", Path(name).name).strip("._") or "upload"
    return stem if Path(stem).suffix.lower() in DATA_SUFFIXES else stem + ".txt"


def save_upload(source: Path, data_dir: Path, max_mb: float) -> str:
    """Copy an uploaded file into `data_dir/uploads` and return its path relative to `data_dir`.

    The copy never follows a symlink and never replaces a file: a taken name becomes `name-2.txt`
    (and so on). Files larger than `max_mb` are refused.
    """
    size = source.stat().st_size
    if size > max_mb * 1024 * 1024:
        raise ValueError(f"{source.name} is {size / 1024 / 1024:,.1f} MB; uploads are limited to {max_mb:g} MB "
                         "(start the app with --max-upload-mb to change it), or put the file in the data folder")
    target_dir = data_dir / UPLOADS
    target_dir.mkdir(parents=True, exist_ok=True)
    inside(target_dir, [data_dir])  # an `uploads` symlink leading elsewhere is refused
    name = safe_upload_name(source.name)
    out, target = create_new_file(target_dir, name)
    try:
        with out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    relative = target.relative_to(data_dir).as_posix()
    if target.name != name:
        gr.Warning(f"{UPLOADS}/{name} already exists, so the upload was saved as {relative} (nothing was replaced).")
    return relative


def build_train_tab(
    picker: ModelPicker, settings: AppSettings, manager: TrainingManager | None, tab: gr.Tab | None = None
) -> TrainingManager:
    manager = manager or TrainingManager(runs_root=settings.checkpoints_dir)
    manager.allow([settings.data_dir])  # jobs read their text and write their token cache there
    checkpoints_dir, data_dir = settings.checkpoints_dir.resolve(), settings.data_dir.resolve()
    registry = picker.registry
    if settings.demo or settings.zero_gpu:
        gr.Markdown(("**Training is off in this public demo.** " if settings.demo else "")
                    + ("" if settings.demo else ZERO_GPU_REFUSAL), elem_id="train-off")

    with gr.Row():
        with gr.Column():
            preset_box = gr.Dropdown(list(PRESETS), value="tiny", label="Model preset")
            init_from_box = gr.Textbox(label="…or continue training a model (checkpoint folder or Hub repo id)",
                                       placeholder="hub/google--gemma-3-270m", elem_id="train-init-from",
                                       info="keeps its own tokenizer and vocabulary; empty = a fresh preset")
            source = gr.Radio([HUB_SOURCE, FILE_SOURCE], value=HUB_SOURCE, label="Training text")
            stories = gr.Number(20_000, precision=0, minimum=0, label="Stories to use (0 = all)",
                                elem_id="train-stories")
            files = data_files(data_dir)
            data_file = gr.Dropdown(files, value=files[0] if files else None, allow_custom_value=True,
                                    label=f"Data file (in the data folder, {data_dir.name}/)",
                                    elem_id="train-data-file")
            upload = gr.File(label="…or upload a text file (stories separated by <|endoftext|> lines)",
                             file_types=list(DATA_SUFFIXES), type="filepath", height=90)
        with gr.Column():
            minutes = gr.Number(5, minimum=0, label="Minutes to train (0 = until the steps are done)",
                                elem_id="train-minutes")
            steps = gr.Number(0, precision=0, minimum=0, label="Steps (0 = until the time is up)",
                              elem_id="train-steps")
            batch = gr.Number(
                0, precision=0, minimum=0, elem_id="train-batch",
                label=f"Batch size (0 = the recipe's: {CPU_BATCH_SIZE} on a CPU, {GPU_BATCH_SIZE} on a GPU)",
            )
            lr = gr.Number(TrainConfig.lr, minimum=0, label="Learning rate")
            context = gr.Number(0, precision=0, minimum=0, label="Context length (0 = the preset's)",
                                elem_id="train-context")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
            with gr.Row():
                run_box = gr.Dropdown(resumable_runs(checkpoints_dir), label="Run to resume", allow_custom_value=True,
                                      scale=3, elem_id="train-run")
                resume = gr.Button("Resume", scale=1, elem_id="train-resume")
    message = gr.Markdown(elem_id="train-message")
    status_md = gr.Markdown(elem_id="train-status")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss", show_label=False, elem_id="train-loss")
        sample = gr.Textbox(label="Latest samples (greedy and sampled) and the step they come from", lines=10,
                            elem_id="train-sample", elem_classes=["big-text"])
    with gr.Accordion("Watch a text learn: the text at the run's newest snapshot", open=False):
        live_text = gr.Textbox(WATCH_TEXT, lines=2, label="Text", elem_id="train-watch-text")
        live_info = gr.Markdown(elem_id="train-watch-info")
        live_tokens = gr.HighlightedText(show_legend=False, show_inline_category=False, combine_adjacent=False,
                                         label="each token coloured by its probability", elem_id="train-watch-tokens",
                                         elem_classes=["big-text"])
    live_seen = gr.State(None)
    status_json = gr.JSON(visible=False)
    seen = gr.State(None)  # what this page last drew, so an unchanged status is not redrawn
    form_run = gr.State(None)  # the run whose settings the form shows
    steps_edited = gr.State(None)  # False once the form shows a run's settings, True after the user edits Steps
    timer = gr.Timer(POLL_SECONDS)

    def data_source(source_: str, data_file_: str | None) -> str:
        if source_ == HUB_SOURCE:
            return DEFAULT_DATASET
        if source_ != FILE_SOURCE:
            raise gr.Error(f"Choose the training text: {HUB_SOURCE!r} or {FILE_SOURCE!r}.")
        if not data_file_:
            raise gr.Error(f"Choose a data file (or upload one): the data folder is {data_dir}.")
        path = allowed_path(data_file_, [data_dir], base=data_dir)
        if not path.is_file():
            raise gr.Error(f"{data_file_} is not a file in the data folder {data_dir}.")
        return str(path)

    def imported_folder(init_from: str | None) -> Path | None:
        """The model to continue from: a folder under the checkpoint folder, or a Hub repo downloaded there."""
        init_from = (init_from or "").strip()
        if not init_from:
            return None
        if not (checkpoints_dir / init_from).exists() and is_repo_id(init_from):
            init_from = registry.download_from_hub(init_from)
        folder = registry.checkpoint_folder(init_from)
        registry.get(str(folder))  # refuses a model without its tokenizer, before a job starts
        return folder

    def refuse_training() -> None:
        refuse_in_demo(settings, "training")
        if settings.zero_gpu:
            raise gr.Error(ZERO_GPU_REFUSAL)

    @user_errors
    def start_training(
        preset, source, stories, data_file, steps, batch_size, lr, context_length, minutes=0, init_from=None
    ):
        refuse_training()
        data = data_source(source, data_file)
        max_steps = integer(steps if steps is not None else 0, "steps", 0, 10_000_000)
        max_time = number(minutes if minutes is not None else 0, "minutes", 0, 7 * 24 * 60) * 60
        if not max_steps and not max_time:
            raise gr.Error("Give the minutes to train, or the number of steps (or both: whichever ends first).")
        batch_size = integer(batch_size if batch_size is not None else 0, "batch size", 0, 4096)
        if preset not in PRESETS:
            raise gr.Error(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        init_folder = imported_folder(init_from)
        run_name = init_folder.name if init_folder else preset
        context_length = integer(context_length if context_length is not None else 0, "context length", 0)
        max_stories = integer(stories if stories is not None else 0, "stories", 0)
        config = TrainConfig(
            preset=preset, data=data, max_stories=max_stories or None, cache_dir=str(data_dir / ".cache"),
            max_steps=max_steps or None, max_time=max_time or None, batch_size=batch_size or None,
            lr=number(lr, "learning rate", 1e-7, 1.0),
            context_length=context_length or None,
            init_from=str(init_folder) if init_folder else None,
            out=str(checkpoints_dir / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"),
        )
        try:
            run_dir = manager.start(config)
        except TrainingBusyError as exc:
            raise gr.Error(f"A training run is already going: {exc}. Stop it first, or wait until it ends.") from None
        return f"Started run `{Path(run_dir).name}`: its checkpoints appear in the model picker as it saves."

    @user_errors
    def stop_training():
        refuse_training()
        if manager.stop():
            return "Stopping: the run finishes its current step, saves a checkpoint, and stops."
        return "No training run is going."

    @user_errors
    def resume_training(run, steps, edited=None):
        """Continue `run`. From the page, Steps counts only when the user changed it (`edited`): else the run
        keeps its own total. Through the API (`edited` None), Steps is the new total (0 or empty: keep it)."""
        refuse_training()
        if not run:
            raise gr.Error("Choose a run to resume.")
        run_dir = allowed_path(run, [checkpoints_dir], base=checkpoints_dir)
        if not (run_dir / "latest" / "training_state.json").is_file():
            raise gr.Error(f"{run} has no latest/ checkpoint with a training state to resume from.")
        try:
            keep = edited is False or steps in (None, "", 0)
            manager.resume(run_dir, max_steps=None if keep else integer(steps, "steps", 1, 10_000_000))
        except TrainingBusyError as exc:
            raise gr.Error(f"A training run is already going: {exc}.") from None
        return f"Resumed run `{run_dir.name}`."

    @user_errors
    def training_status():
        return status_dict(manager.status())

    def render(status: dict, last: dict | None, current_key: str | None):
        """Redraw only what changed since this page last looked (and refresh the pickers on a new checkpoint)."""
        metrics = manager.metrics()
        sample_text = samples_text(status.get("run_dir")) or status.get("sample") or ""
        status = {**status, **run_extras(metrics)}
        runs = resumable_runs(checkpoints_dir)
        keys = [e.key for e in registry.entries()]
        now = {"metrics": len(metrics), "sample": sample_text, "runs": runs, "keys": keys, "run": status.get("run_dir"),
               "step": status.get("step"), "state": status.get("state")}
        last = last or {}
        plot = gr.skip()
        if any(now[k] != last.get(k) for k in ("metrics", "run", "step")):
            plot = loss_figure([*metrics, *live_point(metrics, status)]) if metrics else None
        picker_update = gr.skip()
        if keys != last.get("keys") and last:
            entries = registry.entries()
            picker_update = gr.Dropdown(choices=[(e.label, e.key) for e in entries])
        runs_update = gr.Dropdown(choices=runs) if runs != last.get("runs") else gr.skip()
        sample_update = gr.skip()
        if sample_text != last.get("sample"):
            step = status.get("sample_step")
            label = f"Sample story, written at step {step:,}" if step is not None else "Latest sample story"
            sample_update = gr.Textbox(value=sample_text, label=label)
        # a run that failed right after "Started run …": that message is no longer true
        message_update = "" if now["state"] == "failed" and last.get("state") in ACTIVE else gr.skip()
        return now, status_markdown(status), plot, sample_update, picker_update, runs_update, message_update

    def form_values(run_dir: Path) -> tuple | None:
        """The form's fields set to a run's own settings (run.json), or None when it has none readable."""
        config = run_settings(run_dir)
        if config is None:
            return None
        data = Path(config.data)
        is_file = data.is_absolute() or data.exists()  # else a Hub dataset name
        inside = data.resolve().is_relative_to(data_dir)
        shown = data.resolve().relative_to(data_dir).as_posix() if inside else str(data)
        files = data_files(data_dir)
        name = run_dir.relative_to(checkpoints_dir).as_posix()
        runs = resumable_runs(checkpoints_dir)
        return (
            config.preset, FILE_SOURCE if is_file else HUB_SOURCE, config.max_stories or 0,
            gr.Dropdown(choices=files, value=shown) if is_file else gr.Dropdown(choices=files),
            config.max_steps or 0, config.batch_size, config.lr, config.context_length or 0,
            round(config.max_time / 60, 2) if config.max_time else 0, config.init_from or "",
            gr.Dropdown(choices=runs, value=name if name in runs else None), name, False,
        )

    def fill_form(shown_run: str | None):
        """On opening the tab: the data-file and run lists read now, and the form showing the running (or last)
        run's real settings, unless it already shows that run (the user's edits stay)."""
        status = manager.status()
        run_dir = Path(status.run_dir) if status.run_dir else last_run(checkpoints_dir)
        lists = [gr.Dropdown(choices=data_files(data_dir)), gr.Dropdown(choices=resumable_runs(checkpoints_dir))]
        values = None
        if (run_dir is not None and run_dir.is_relative_to(checkpoints_dir)
                and run_dir.relative_to(checkpoints_dir).as_posix() != shown_run):
            values = form_values(run_dir)
        if values is None:
            skip = gr.skip()
            return skip, skip, skip, lists[0], skip, skip, skip, skip, skip, skip, lists[1], skip, skip
        return values

    @user_errors
    def choose_run(run: str | None):
        """The user chose a run to resume: show its settings (Resume then keeps its total)."""
        if not run:
            return (gr.skip(),) * 13
        run_dir = allowed_path(run, [checkpoints_dir], base=checkpoints_dir)
        values = form_values(run_dir)
        if values is None:
            raise gr.Error(f"{run} has no readable {RUN_CONFIG_FILE}: it is not a run folder.")
        return values

    def started():
        status = manager.status()
        name = Path(status.run_dir).relative_to(checkpoints_dir).as_posix() if status.run_dir else None
        return name, False

    def uploaded(path: str | None):
        refuse_in_demo(settings, "uploading files")
        if not path:
            return gr.skip(), gr.skip()
        relative = save_upload(Path(path), data_dir, settings.max_upload_mb)
        gr.Info(f"Saved as {relative} in the data folder.")
        return relative, FILE_SOURCE

    @user_errors
    def watch_newest(text: str, last: tuple | None):
        seen_now, line, highlighted = newest_snapshot_view(manager.status().run_dir, text, settings, last)
        return seen_now, line or gr.skip(), gr.skip() if highlighted is None else highlighted

    timer.tick(watch_newest, [live_text, live_seen], [live_seen, live_info, live_tokens], api_visibility="private",
               show_progress="hidden")
    train_inputs = [preset_box, source, stories, data_file, steps, batch, lr, context, minutes, init_from_box]
    form = [*train_inputs, run_box, form_run, steps_edited]
    # the old message goes first: a refused start must not leave "Started run …" of an earlier one on screen
    start.click(lambda: "", None, message, api_visibility="private", queue=False).then(
        start_training, train_inputs, message, api_name="start_training"
    ).success(started, None, [form_run, steps_edited], api_visibility="private")
    stop.click(stop_training, None, message, api_name="stop_training")
    resume.click(lambda: "", None, message, api_visibility="private", queue=False).then(
        resume_training, [run_box, steps, steps_edited], message, api_name="resume_training"
    )
    steps.input(lambda: True, None, steps_edited, api_visibility="private", queue=False)
    run_box.input(choose_run, run_box, form, api_visibility="private")
    if tab is not None:
        tab.select(fill_form, form_run, form, api_visibility="private")
    upload.upload(user_errors(uploaded), upload, [data_file, source], api_name="upload_data").success(
        lambda chosen: gr.Dropdown(choices=data_files(data_dir), value=chosen), data_file, data_file,
        api_visibility="private",
    )
    timer.tick(training_status, None, status_json, api_name="training_status", show_progress="hidden").then(
        render, [status_json, seen, picker.state],
        [seen, status_md, loss_plot, sample, picker.dropdown, run_box, message],
        api_visibility="private", show_progress="hidden",
    )
    return manager
