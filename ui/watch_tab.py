"""Watch it learn: one text and one prompt through every snapshot of a training run, and any two
checkpoints compared token by token.

"Watch" scores the text with every snapshot once (slm.learning, cached per run, text and prompt);
the slider, the play button and the position only redraw from that result.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from slm import Tokenizer, list_checkpoints, load, load_tokenizer
from slm.inspection import NextTokenView
from slm.learning import LearningTimeline, TimelineCache, compare_models, score_text, watch_run
from slm.plots import learning_figure, next_token_bars, percent
from slm.snapshots import list_snapshots, runs_with_snapshots
from slm.training import read_metrics

from .common import AppSettings, allowed_path, gpu, integer, user_errors
from .inspect_tab import DEFAULT_TEXT

DEFAULT_PROMPT = "Once upon a time, there was a little girl named"
PLAY_SECONDS = 1.5
MOST_CHANGED = 10
LEGEND = (
    '<div class="prob-legend"><span>probability the model gave each token at this snapshot:</span> <span>0%</span>'
    '<span class="prob-bar"></span><span>100%</span></div>'
)


def run_choices(checkpoints_dir: Path) -> list[str]:
    """Runs with snapshots, as paths relative to the checkpoint folder, newest first."""
    return [r.relative_to(checkpoints_dir).as_posix() for r in runs_with_snapshots(checkpoints_dir)]


def checkpoint_choices(checkpoints_dir: Path) -> list[str]:
    """Every checkpoint (snapshots included) for the comparison, as paths relative to the checkpoint folder."""
    infos = list_checkpoints(checkpoints_dir, include_snapshots=True)
    return sorted(i.path.relative_to(checkpoints_dir).as_posix() for i in infos)


def run_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The tokenizer a run trained with: its latest/ carries it (none there: GPT-2)."""
    return load_tokenizer(Path(run_dir) / "latest")


def change_html(changes: list[tuple[str, float]]) -> str:
    """Tokens on a green (more likely in b) or red (less likely) background, by the log-probability change."""
    spans = []
    for token, delta in changes:
        strength = min(abs(delta) / 3.0, 1.0)  # a change of 3 nats (20x) is full colour
        rgb = "34, 160, 70" if delta > 0 else "220, 50, 50"
        text = html.escape(token).replace("\n", "↵<br>")
        style = f"background: rgba({rgb}, {strength:.2f}); border-radius: 3px; padding: 1px 0;"
        spans.append(f'<span class="watch-change" title="{delta:+.2f} nats" style="{style}">{text}</span>')
    legend = ('<div class="prob-note">green: more likely in B than in A · red: less likely · '
              'full colour at a change of 3 nats (20×); hover a token for its change</div>')
    body = "".join(spans)
    return f'<div class="watch-compare big-text" style="white-space: pre-wrap; line-height: 1.9;">{body}</div>{legend}'


def build_watch_tab(settings: AppSettings) -> None:
    root = settings.checkpoints_dir.resolve()
    cache = TimelineCache()

    def run_folder(run: str | None) -> Path:
        if not run:
            raise gr.Error("Choose a run (a folder in the checkpoint folder whose training kept snapshots).")
        folder = allowed_path(run, [root], base=root)
        if not list_snapshots(folder):
            raise gr.Error(f"{run} has no snapshots. Runs keep them as they train (in snapshots/step-*); "
                           "train a run, then press ↻.")
        return folder

    def timeline_for(run: str, text: str, prompt: str | None, progress=None) -> LearningTimeline:
        if not (text or "").strip():
            raise gr.Error("Enter a text to watch.")
        folder = run_folder(run)
        key = cache.key(folder, text, prompt)
        timeline = cache.get(key)
        if timeline is None:
            def on_progress(i: int, n: int) -> None:
                if progress is not None:
                    progress((i, n), desc="scoring the text with each snapshot")

            timeline = watch_run(folder, run_tokenizer(folder), text, prompt, settings.device, settings.dtype,
                                 on_progress)
            cache.put(key, timeline)
        return timeline

    def checkpoint(key: str | None, name: str):
        if not key:
            raise gr.Error(f"Choose checkpoint {name}.")
        folder = allowed_path(key, [root], base=root)
        if not folder.exists():
            raise gr.Error(f"There is no checkpoint at {key}. Press ↻ to refresh the list.")
        return load(folder, device=settings.device, dtype=settings.dtype)

    gr.Markdown("Pick a run, enter a text and press **Watch**: the text is scored by every snapshot the run "
                "kept (steps 0, 10, 20, 50, 100, …). Move the slider, or press ▶, to watch the model learn.")
    runs = run_choices(root)
    with gr.Row(equal_height=True):
        run_box = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run", allow_custom_value=True, scale=3,
                              elem_id="watch-run")
        refresh = gr.Button("↻", scale=0, min_width=60, elem_id="watch-refresh")
        prompt_box = gr.Textbox(DEFAULT_PROMPT, label="Prompt to continue", scale=3, elem_id="watch-prompt")
        watch = gr.Button("Watch", variant="primary", scale=1, elem_id="watch-button")
    text_box = gr.Textbox(DEFAULT_TEXT, lines=2, label="Text", elem_id="watch-text")
    with gr.Row(equal_height=True):
        snapshot_slider = gr.Slider(0, 1, value=0, step=1, label="Snapshot", scale=6, elem_id="watch-slider")
        play = gr.Button("▶ Play", scale=0, min_width=90, elem_id="watch-play")
        pause = gr.Button("Pause", scale=0, min_width=90, elem_id="watch-pause")
    status = gr.Markdown(elem_id="watch-status")
    tokens = gr.HighlightedText(
        label="The text, each token coloured by its probability (click one to see the candidates there)",
        show_legend=False, show_inline_category=False, combine_adjacent=False, elem_id="watch-tokens",
        elem_classes=["big-text"],
    )
    gr.HTML(LEGEND)
    curves = gr.Plot(show_label=False, elem_id="watch-curves")
    with gr.Row():
        with gr.Column():
            greedy = gr.Textbox(label="Greedy continuation of the prompt", lines=2, elem_id="watch-greedy")
            sampled = gr.Textbox(label="Sampled continuation (temperature 0.8, top-k 50, seed 0)", lines=2,
                                 elem_id="watch-sampled")
            position = gr.Slider(0, 255, value=0, step=1, elem_id="watch-position",
                                 label="Position: what does the model expect after this token?")
        candidates = gr.Plot(show_label=False, elem_id="watch-candidates")
    with gr.Accordion("Compare two checkpoints", open=False):
        choices = checkpoint_choices(root)
        with gr.Row(equal_height=True):
            a_box = gr.Dropdown(choices, value=choices[0] if choices else None, label="A (before)",
                                allow_custom_value=True, elem_id="compare-a")
            b_box = gr.Dropdown(choices, value=choices[-1] if choices else None, label="B (after)",
                                allow_custom_value=True, elem_id="compare-b")
            compare = gr.Button("Compare", elem_id="compare-button")
        compare_summary = gr.Markdown(elem_id="compare-summary")
        compare_view = gr.HTML(elem_id="compare-view")
        changed_table = gr.Dataframe(headers=["position", "token", "p in A", "p in B", "change (nats)"],
                                     label="The tokens that changed most", interactive=False)
    with gr.Accordion("Raw numbers (what the `watch_learning` API returns)", open=False):
        raw = gr.JSON()
    state = gr.State(None, time_to_live=3600)
    timer = gr.Timer(PLAY_SECONDS, active=False)

    @gpu
    @user_errors
    def start_watching(run, text, prompt, progress=gr.Progress()):  # noqa: B008 (how Gradio injects it)
        timeline = timeline_for(run, text, (prompt or "").strip() or None, progress)
        metrics = read_metrics(run_folder(run))
        session = {"timeline": timeline, "metrics": metrics}
        last = len(timeline.snapshots) - 1
        n = len(timeline.tokens)
        return (
            session,
            gr.Slider(minimum=0, maximum=max(last, 1), value=last, step=1,
                      label=f"Snapshot ({len(timeline.snapshots)} kept: steps "
                            f"{', '.join(f'{s:,}' for s in timeline.steps)})"),
            gr.Slider(minimum=0, maximum=max(n - 1, 1), value=min(n - 1, max(n // 2, 0)), step=1),
            timeline.as_dict(),
        )

    def show(index, pos, session):
        if session is None:
            return (gr.skip(),) * 6
        timeline: LearningTimeline = session["timeline"]
        i = integer(index, "snapshot", 0, len(timeline.snapshots) - 1)
        snap = timeline.snapshots[i]
        scored = snap.scored
        line = (f"**step {snap.step:,}** of {timeline.steps[-1]:,} · {snap.tokens_seen:,} tokens seen · "
                f"this text: loss **{scored.loss:.2f}** nats/token, **{scored.bits_per_byte:.2f}** bits per byte "
                f"({len(scored.tokens)} tokens, {scored.num_bytes} bytes)")
        if scored.dropped_tokens:
            line += f" · the last {scored.dropped_tokens} tokens did not fit the context and are not scored"
        highlighted = list(zip(scored.tokens, scored.probabilities, strict=True))
        figure = learning_figure(timeline.steps, timeline.losses, session["metrics"], snap.step)
        return line, highlighted, figure, candidates_figure(i, pos, session), snap.greedy or "", snap.sampled or ""

    def candidates_figure(index, pos, session):
        scored = session["timeline"].snapshots[int(index)].scored
        p = min(max(int(pos or 0), 0), len(scored.tokens) - 1)
        view = NextTokenView(p, scored.candidates[p], scored.entropies[p])
        return next_token_bars(view, scored.tokens[p])

    @user_errors
    def show_position(index, pos, session):
        return gr.skip() if session is None else candidates_figure(index, pos, session)

    def choose_token(event: gr.SelectData):
        return event.index if isinstance(event.index, int) else event.index[0]

    def tick(index, session):
        if session is None:
            return gr.skip(), gr.Timer(active=False)
        last = len(session["timeline"].snapshots) - 1
        nxt = int(index) + 1
        if nxt >= last:
            return last, gr.Timer(active=False)
        return nxt, gr.skip()

    def start_playing(index, session):
        if session is None:
            raise gr.Error("Press Watch first.")
        at_end = int(index) >= len(session["timeline"].snapshots) - 1
        return (0 if at_end else gr.skip()), gr.Timer(active=True)

    @gpu
    @user_errors
    def compare_checkpoints(a: str, b: str, text: str) -> dict:
        """Per token of `text`, the change in log-probability from checkpoint `a` to checkpoint `b`
        (paths inside the checkpoint folder, snapshots included)."""
        if not (text or "").strip():
            raise gr.Error("Enter a text to compare the checkpoints on.")
        first, second = checkpoint(a, "A"), checkpoint(b, "B")
        if first.tokenizer.identity != second.tokenizer.identity:
            raise gr.Error("The two checkpoints use different tokenizers: their tokens cannot be compared one by one.")
        comparison = compare_models(first.model, second.model, first.tokenizer, text, a, b)
        return comparison.as_dict(MOST_CHANGED)

    def compare_view_of(a, b, text):
        data = compare_checkpoints(a, b, text)
        n = len(data["tokens"])
        summary = (f"**{data['a']}** → **{data['b']}**: loss {data['loss_a']:.2f} → {data['loss_b']:.2f} nats/token; "
                   f"{data['improved']} of {n} tokens more likely, {data['worsened']} less likely.")
        rows = [[c["position"], c["token"], percent(c["probability_a"]), percent(c["probability_b"]),
                 round(c["delta"], 2)] for c in data["most_changed"]]
        return summary, change_html(list(zip(data["tokens"], data["log_prob_change"], strict=True))), rows

    @gpu
    @user_errors
    def watch_learning(run: str, text: str) -> dict:
        """The text scored by every snapshot of a run: the run and `snapshots`, each with `step`,
        `tokens_seen`, `loss` (mean over the text, nats), `bits_per_byte` and per-token `probabilities`."""
        return timeline_for(run, text, None).as_dict()

    def refreshed(current):
        found = run_choices(root)
        value = current if current in found else (found[0] if found else None)
        everything = checkpoint_choices(root)
        return gr.Dropdown(choices=found, value=value), gr.Dropdown(choices=everything), gr.Dropdown(choices=everything)

    view_outputs = [status, tokens, curves, candidates, greedy, sampled]
    watched = watch.click(start_watching, [run_box, text_box, prompt_box], [state, snapshot_slider, position, raw],
                          api_visibility="private")
    watched.success(show, [snapshot_slider, position, state], view_outputs, api_visibility="private")
    snapshot_slider.change(user_errors(show), [snapshot_slider, position, state], view_outputs,
                           api_visibility="private", show_progress="hidden")
    position.change(show_position, [snapshot_slider, position, state], candidates, api_visibility="private",
                    show_progress="hidden")
    tokens.select(choose_token, None, position, api_visibility="private")
    play.click(user_errors(start_playing), [snapshot_slider, state], [snapshot_slider, timer], api_visibility="private")
    pause.click(lambda: gr.Timer(active=False), None, timer, api_visibility="private")
    timer.tick(tick, [snapshot_slider, state], [snapshot_slider, timer], api_visibility="private",
               show_progress="hidden")
    refresh.click(refreshed, run_box, [run_box, a_box, b_box], api_visibility="private")
    compare.click(user_errors(compare_view_of), [a_box, b_box, text_box],
                  [compare_summary, compare_view, changed_table], api_visibility="private")
    gr.api(watch_learning, api_name="watch_learning")
    gr.api(compare_checkpoints, api_name="compare_checkpoints")


def newest_snapshot_view(
    run_dir: str | Path | None, text: str, settings: AppSettings, seen: tuple | None
) -> tuple[tuple | None, str, list | None]:
    """For the Train tab's live view: the text at the newest snapshot of the running run.

    Returns (what was drawn, markdown, highlighted tokens); scores only when the newest snapshot or
    the text changed since `seen` (else the markdown is empty and the tokens None: keep what is shown).
    """
    if not run_dir or not (text or "").strip():
        return seen, "", None
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        return seen, "", None
    newest = snapshots[-1]
    key = (str(run_dir), newest.step, text)
    if key == seen:
        return seen, "", None
    model = load(newest.path, device=settings.device, dtype=settings.dtype).model
    scored = score_text(model, run_tokenizer(run_dir), text)
    line = (f"At the newest snapshot, **step {newest.step:,}** ({newest.tokens_seen:,} tokens seen): this text's "
            f"loss is **{scored.loss:.2f}** nats/token, **{scored.bits_per_byte:.2f}** bits per byte.")
    return key, line, list(zip(scored.tokens, scored.probabilities, strict=True))
