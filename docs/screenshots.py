"""Take the README's screenshots from the real app at 1280x720 (a projector): one PNG per tab.

    python docs/screenshots.py --checkpoints /tmp/shots/checkpoints --data-dir /tmp/shots/data

Serves the playground in-process, drives it with Playwright and Debian's Chromium, and writes
docs/<tab>.png: what a 1280x720 screen shows (Generate, Tokens, Step by step), or the whole page
at that width (Inspect, Train). The Train shot resumes a trained run (--resume-run) or starts one
on the first text file in the data folder, and stops it after the shot. The PNGs are reduced to a
256-colour palette to stay small.

    python docs/screenshots.py --checkpoints checkpoints --data-dir /tmp/data --watch-run watch-2000

takes only the "Watch it learn" shot (docs/watch.png, 1280x720) of a run with snapshots, at the
snapshot --watch-snapshot (default: the middle one).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from slm.jobs import TrainingManager  # noqa: E402
from ui import build_app, launch_options  # noqa: E402
from ui.common import AppSettings  # noqa: E402

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big red ball under a tree. Lily ran to the ball and picked it up. "
    "She was very happy and played with the ball all day. When the sun went down, Lily went home "
    "and told her mom about the ball. Her mom smiled and gave her a big hug."
)


def save(page, path: Path, full_page: bool = False) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    png = page.screenshot(full_page=full_page)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.0f} KB")


def wait_until_still(page, selectors: list[str], seconds: float = 3.0) -> None:
    """Wait until the texts in `selectors` stop changing (streamed outputs have finished)."""
    last, still_since = None, None
    while True:
        now = [page.locator(sel).input_value() for sel in selectors]
        if now != last:
            last, still_since = now, page.evaluate("performance.now()")
        elif page.evaluate("performance.now()") - still_since > seconds * 1000:
            return
        page.wait_for_timeout(250)


def watch_shot(page, run: str, snapshot: int | None, path: Path) -> None:
    """The Watch it learn tab at 1280x720, scrolled to the snapshot slider, tokens and curves."""
    page.set_viewport_size({"width": 1280, "height": 720})
    page.get_by_role("tab", name="Watch it learn").click()
    page.locator("#watch-run input").fill(run)
    page.locator("#watch-run input").press("Enter")
    page.locator("#watch-text textarea").fill(STORY)
    page.click("#watch-button")
    page.locator("#watch-curves img").wait_for()
    slider = page.locator("#watch-slider input[type=number]")
    count = int(slider.get_attribute("max")) + 1
    index = count // 2 if snapshot is None else snapshot
    slider.fill(str(index))
    slider.press("Enter")
    page.locator("#watch-status").get_by_text(re.compile(r"step [\d,]+ of")).wait_for()
    page.wait_for_timeout(3000)
    page.locator("#watch-slider").scroll_into_view_if_needed()
    page.evaluate("document.querySelector('#watch-slider').scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    png = page.screenshot()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    image.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.0f} KB, snapshot {index} of {count}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--train-steps", type=int, default=2000, help="steps of the run the Train shot shows")
    parser.add_argument("--resume-run", help="resume this run (a folder in --checkpoints) instead of starting one")
    parser.add_argument("--shot-at-step", type=int, default=100, help="take the Train shot once the run logs this step")
    parser.add_argument("--watch-run", help="take only the Watch it learn shot, of this run (in --checkpoints)")
    parser.add_argument("--watch-snapshot", type=int, help="snapshot index the Watch shot shows [middle]")
    args = parser.parse_args()

    settings = AppSettings(args.checkpoints.resolve(), args.data_dir.resolve(), torch.device("cpu"), torch.float32)
    manager = TrainingManager(runs_root=settings.checkpoints_dir)
    demo = build_app(settings, manager)
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **launch_options())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.wait_for_selector("#generate-button")
            if args.watch_run:
                watch_shot(page, args.watch_run, args.watch_snapshot, args.out / "watch.png")
                browser.close()
                return

            page.locator("#generate-prompt textarea").fill("Once upon a time, there was a little dog named")
            page.click("#generate-button")
            page.locator("#generate-stats").get_by_text("done").wait_for()
            page.click("#compare-button")
            wait_until_still(page, ["#greedy-output textarea", "#sampled-output textarea"])
            save(page, args.out / "generate.png")

            page.get_by_role("tab", name="Tokens").click()
            page.locator("#tokens-text textarea").fill(
                "Once upon a time, there was a little girl named Lily.\nShe said: \"Wow, a café!\"")
            page.click("#tokens-button")
            page.locator("#tokens-table").get_by_text("Lily").first.wait_for()
            page.wait_for_timeout(1000)
            save(page, args.out / "tokens.png")

            page.get_by_role("tab", name="Step by step").click()
            page.locator("#step-chart .dist-row").first.wait_for()
            temperature = page.locator("#step-temperature input[type=number]")
            temperature.fill("0.8")
            temperature.press("Enter")
            page.wait_for_timeout(1500)
            for _ in range(3):
                page.click("#step-sample")
                page.wait_for_timeout(1500)
            page.locator("#step-choice label").nth(1).click()
            page.click("#step-pick")
            page.locator("#step-info").get_by_text("4 tokens added").wait_for()
            page.click("#step-sample")
            page.locator("#step-info").get_by_text("5 tokens added").wait_for()
            page.wait_for_timeout(1000)
            save(page, args.out / "step-by-step.png")

            page.get_by_role("tab", name="Inspect").click()
            page.locator("#inspect-text textarea").fill(STORY)
            page.click("#inspect-button")
            page.locator("#inspect-grid img").wait_for()
            page.locator("#inspect-tokens").get_by_text(" ball").first.click()
            page.get_by_text(re.compile(r"After .* ball")).first.wait_for()
            page.wait_for_timeout(2000)
            save(page, args.out / "inspect.png", full_page=True)

            page.get_by_role("tab", name="Train").click()
            if args.resume_run:  # continue a trained run a few steps: its whole loss history is on the plot
                page.locator("#train-run input").fill(args.resume_run)
                page.locator("#train-run input").press("Enter")  # the form shows the run's own settings
                page.wait_for_timeout(2000)
                page.click("#train-resume")  # to the run's own total
            else:
                page.get_by_text("A file in the data folder").click()
                # the form shows the last run's own settings, whose data file may lie outside the data folder
                first_text = sorted(args.data_dir.glob("*.txt"))[0].name
                page.locator("#train-data-file input").fill(first_text)
                page.locator("#train-data-file input").press("Enter")
                page.locator("#train-steps input").fill(str(args.train_steps))
                page.click("#train-start")
            page.locator("#train-status").get_by_text(re.compile(r"running · run")).wait_for()
            page.wait_for_function(  # the status moves every ~2 s, so it may never show the exact step
                "n => { const m = document.querySelector('#train-status').innerText.match(/step ([\\d,]+) \\//);"
                " return m && parseInt(m[1].replaceAll(',', '')) >= n; }",
                arg=args.shot_at_step, timeout=1_800_000,
            )
            page.wait_for_function(
                "document.querySelector('#train-sample textarea').value.length > 50", timeout=1_800_000
            )
            page.wait_for_timeout(3000)
            save(page, args.out / "train.png", full_page=True)
            browser.close()
    finally:
        if manager.stop():
            manager.wait(timeout=120)
        demo.close()


if __name__ == "__main__":
    main()
