"""The playground in a real browser: Playwright driving Debian's Chromium against the real server.

Skipped when Playwright or Chromium is missing, except where SLM_REQUIRE_BROWSER=1 (CI): there a
missing browser fails. A failing step leaves a screenshot in test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from app_helpers import make_checkpoint, playground_config, running_app, write_stories

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TIMEOUT_MS = 60_000
VIEWPORT = {"width": 1280, "height": 720}  # a projector


def _browser_missing_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM}"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _browser_missing_reason()
    if reason:
        if os.environ.get("SLM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SLM_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-app")
    make_checkpoint(root / "checkpoints", playground_config())
    write_stories(root / "data" / "stories.txt")
    with running_app(root / "checkpoints", root / "data") as (url, _manager):
        yield {"url": url, "root": root}


@pytest.fixture
def page(browser, app, request):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app["url"])
    page.wait_for_selector("#generate-button")
    page.test_name = request.node.name
    yield page
    context.close()


@contextmanager
def step(page, name: str):
    """Run one step of a test; on failure keep a screenshot of the page as it was."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        safe = re.sub(r"[^\w.-]+", "_", f"{page.test_name}-{name}")
        page.screenshot(path=str(ARTIFACTS / f"{safe}.png"), full_page=True)
        raise


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_every_tab_renders(page):
    with step(page, "model-picker"):
        page.get_by_text("small-run/best", exact=False).first.wait_for()
    for name, marker in [
        ("Step by step", "#step-sample"), ("Inspect", "#inspect-button"), ("Train", "#train-start"),
        ("Generate", "#generate-button"),
    ]:
        with step(page, f"tab-{name}"):
            open_tab(page, name)
            page.locator(marker).wait_for(state="visible")


def test_generate_streams_into_the_page(page):
    output = page.locator("#generate-output textarea")
    with step(page, "generate"):
        page.locator("#generate-prompt textarea").fill("Once upon a time")
        page.click("#generate-button")
        page.locator("#generate-stats").get_by_text("done").wait_for(timeout=180_000)  # a busy CPU is slow
        text = output.input_value()
        assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 10
        assert re.search(r"\d+ new tokens", page.locator("#generate-stats").inner_text())
    with step(page, "compare"):
        page.click("#compare-button")
        page.wait_for_function(
            "() => document.querySelector('#greedy-output textarea').value.length > 20"
            " && document.querySelector('#sampled-output textarea').value.length > 20"
        )


def on_screen(page, selector: str) -> bool:
    """True when the element lies wholly inside the viewport as the page is now (nothing scrolled)."""
    box = page.locator(selector).bounding_box()
    return box is not None and box["x"] >= 0 and box["y"] >= 0 and \
        box["x"] + box["width"] <= VIEWPORT["width"] and box["y"] + box["height"] <= VIEWPORT["height"]


def test_step_by_step_fits_one_projector_screen(page):
    with step(page, "open"):
        open_tab(page, "Step by step")
        page.locator("#step-chart .dist-row").first.wait_for(state="visible")
        assert page.evaluate("window.scrollY") == 0
        for selector in ("#step-prompt", "#step-story", "#step-sample", "#step-pick", "#step-undo", "#step-chart",
                         "#step-temperature", "#step-top-k", "#step-top-p", "#step-seed", "#step-help"):
            assert on_screen(page, selector), f"{selector} is not inside the 1280x720 screen"
        assert page.locator("#step-chart .dist-token").count() == 8
        before = page.locator("#step-chart").inner_html()
        story_before = page.locator("#step-story").inner_text()
    with step(page, "typed-temperature"):  # typing a value and Enter redraws the distribution
        box = page.locator("#step-temperature input[type=number]")
        box.fill("0.3")
        box.press("Enter")
        page.wait_for_function("b => document.querySelector('#step-chart').innerHTML !== b", arg=before)
        assert "sampler · entropy" in page.locator("#step-chart").inner_text()
    with step(page, "sample-announced"):
        page.click("#step-sample")
        info = page.locator("#step-info")
        info.get_by_text(re.compile(r"Drew .+: [\d.]+%, rank \d+")).wait_for()
        info.get_by_text("1 token added").wait_for()
        assert page.locator("#step-story").inner_text() != story_before
    with step(page, "pick"):
        page.locator("#step-choice label").nth(1).click()
        page.click("#step-pick")
        page.locator("#step-info").get_by_text(re.compile(r"You chose .+, rank 2")).wait_for()
        page.locator("#step-info").get_by_text("2 tokens added").wait_for()
    with step(page, "hide-explanations"):
        page.locator("#step-explain input").uncheck()
        page.locator("#step-help").wait_for(state="hidden")


def test_tokens_view(page):
    with step(page, "tokens"):
        open_tab(page, "Tokens")
        page.locator("#tokens-text textarea").fill("Hello world")  # redrawn as the text changes
        page.locator("#tokens-ids textarea").wait_for()
        page.wait_for_function("() => document.querySelector('#tokens-ids textarea').value === '15496 995'")
        page.locator("#tokens-summary").get_by_text("2 tokens").wait_for()
        # the bytes of ' world' (Gradio also keeps a hidden copy of each cell for measuring)
        page.locator("#tokens-table").get_by_text("20 77 6f 72 6c 64").filter(visible=True).first.wait_for()


def test_inspect_in_the_page(page):
    with step(page, "inspect"):
        open_tab(page, "Inspect")
        page.locator("#inspect-text textarea").fill("The cat sat on the mat. The dog sat on the log.")
        page.click("#inspect-button")
        page.locator("#inspect-tokens").get_by_text("mat").first.wait_for()
        for plot in ("#inspect-candidates", "#inspect-lens", "#inspect-heatmap", "#inspect-grid"):
            page.locator(f"{plot} img").wait_for(state="visible")
    with step(page, "choose-position"):
        page.locator("#inspect-tokens").get_by_text("cat").first.click()
        page.get_by_text(re.compile(r"After \*?\*?' cat'")).first.wait_for()
    with step(page, "type-position"):  # typing a position and Enter moves there too
        box = page.locator("#inspect-position input[type=number]")
        box.fill("4")
        box.press("Enter")
        page.get_by_text(re.compile(r"After \*?\*?' the'.*\(position 4\)")).first.wait_for()


def test_training_in_the_page(page):
    with step(page, "start"):
        open_tab(page, "Train")
        page.get_by_text("A file in the data folder").click()
        page.locator("#train-data-file input").fill("stories.txt")
        page.locator("#train-data-file input").press("Enter")
        for field, value in (("#train-steps", "2000"), ("#train-batch", "2"), ("#train-context", "32")):
            page.locator(f"{field} input").fill(value)
        page.click("#train-start")
        page.locator("#train-message").get_by_text("Started run").wait_for()
    with step(page, "loss-plot"):
        status = page.locator("#train-status")
        status.get_by_text(re.compile(r"running · run tiny-.* step [1-9][\d,]* / 2,000")).wait_for(timeout=180_000)
        status.get_by_text("train loss").wait_for(timeout=180_000)
        page.locator("#train-loss img").wait_for(state="visible")
    with step(page, "second-start-refused"):
        page.click("#train-start")
        page.get_by_text("already going").first.wait_for()
    with step(page, "reload-shows-the-runs-settings"):
        page.reload()
        open_tab(page, "Train")
        page.locator("#train-status").get_by_text(re.compile(r"run tiny-")).wait_for()
        page.locator("#train-loss img").wait_for(state="visible")
        page.wait_for_function("() => document.querySelector('#train-steps input').value === '2000'")
        assert page.locator("#train-batch input").input_value() == "2"
        assert page.locator("#train-context input").input_value() == "32"
        assert page.locator("#train-data-file input").input_value() == "stories.txt"
    with step(page, "stop"):
        page.click("#train-stop")
        page.locator("#train-message").get_by_text("Stopping").wait_for()
        page.locator("#train-status").get_by_text(re.compile(r"stopped · run tiny-")).wait_for(timeout=180_000)
    with step(page, "resume-after-reload-keeps-the-total"):
        page.reload()
        open_tab(page, "Train")
        page.wait_for_function("() => document.querySelector('#train-run input').value.startsWith('tiny-')")
        page.wait_for_function("() => document.querySelector('#train-steps input').value === '2000'")
        page.click("#train-resume")
        page.locator("#train-message").get_by_text("Resumed run").wait_for()
        page.locator("#train-status").get_by_text(re.compile(r"running · run tiny-.* / 2,000")).wait_for(
            timeout=180_000)
        page.click("#train-stop")
        page.locator("#train-status").get_by_text(re.compile(r"stopped · run tiny-.* / 2,000")).wait_for(
            timeout=180_000)
    with step(page, "new-checkpoint-in-picker"):
        page.locator("#model-picker input").click()
        page.get_by_role("option", name=re.compile(r"tiny-[0-9-]+ · latest")).first.wait_for()


def test_watch_it_learn_in_the_page(page, app):
    import torch

    from slm import build_model, load_tokenizer
    from slm.snapshots import save_snapshot

    text = "The cat sat on the mat. The dog sat on the log."
    run = app["root"] / "checkpoints" / "watched"
    model = build_model(playground_config(), seed=0)
    save_snapshot(run, model, 0, 0)
    tokenizer = load_tokenizer()
    ids = torch.tensor([[tokenizer.eot_id, *tokenizer.encode(text)]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):  # learn the text itself, so that the later snapshot predicts it well
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_snapshot(run, model, 10, 10 * ids.shape[1])
    colours = "els => els.map(e => getComputedStyle(e).backgroundColor)"
    with step(page, "open"):
        open_tab(page, "Watch it learn")
        page.click("#watch-refresh")
        page.locator("#watch-run input").fill("watched")
        page.locator("#watch-run input").press("Enter")
        page.locator("#watch-text textarea").fill(text)
        page.click("#watch-button")  # scores the text with every snapshot: slow on a busy CPU
        page.locator("#watch-status").get_by_text("step 10 of 10").wait_for(timeout=240_000)
        page.locator("#watch-curves img").wait_for(state="visible")
        page.locator("#watch-candidates img").wait_for(state="visible")
        at_ten = page.eval_on_selector_all("#watch-tokens .score-token", colours)
        assert len(at_ten) >= 12
    with step(page, "slider"):
        number = page.locator("#watch-slider input[type=number]")
        number.fill("0")
        number.press("Enter")
        page.locator("#watch-status").get_by_text("step 0 of 10").wait_for(timeout=120_000)
        page.wait_for_function(
            "prev => JSON.stringify([...document.querySelectorAll('#watch-tokens .score-token')]"
            ".map(e => getComputedStyle(e).backgroundColor)) !== prev", arg=json.dumps(at_ten), timeout=120_000
        )
        at_zero = page.eval_on_selector_all("#watch-tokens .score-token", colours)
        assert len(at_zero) == len(at_ten) and at_zero != at_ten
    with step(page, "play"):
        page.click("#watch-play")
        page.locator("#watch-status").get_by_text("step 10 of 10").wait_for(timeout=120_000)
