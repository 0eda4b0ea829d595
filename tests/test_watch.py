"""Watch it learn: snapshots kept by a real training run, and the watch_learning / compare_checkpoints
APIs of the real app called through gradio_client."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from app_helpers import running_app
from gradio_client import Client
from gradio_client.exceptions import AppError
from training_helpers import make_stories, quick_config, stories_file, write_raw_txt

from slm import list_checkpoints, load_model, load_tokenizer
from slm.learning import score_text
from slm.snapshots import is_snapshot_step, list_snapshots, snapshot_steps
from slm.training import train

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big red ball under a tree."
)
TINYSTORIES_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "train-first-2315.txt"


def test_the_schedule_is_dense_early_and_sparse_late():
    assert snapshot_steps(2000) == [0, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert snapshot_steps(25) == [0, 10, 20, 25]
    assert snapshot_steps(5) == [0, 5]
    for max_steps in (7, 25, 300, 5000):
        planned = set(snapshot_steps(max_steps))
        assert {s for s in range(max_steps + 1) if is_snapshot_step(s, max_steps)} == planned


def test_a_short_run_keeps_snapshots_at_the_planned_steps(tmp_path):
    config = quick_config(tmp_path, stories_file(tmp_path), max_steps=12, eval_every=12, sample_tokens=0)
    train(config)
    run = Path(config.out)
    snapshots = list_snapshots(run)
    assert [s.step for s in snapshots] == [0, 10, 12]
    tokens_per_step = config.batch_size * config.context_length
    assert [s.tokens_seen for s in snapshots] == [s.step * tokens_per_step for s in snapshots]
    assert [p.name for p in sorted((run / "snapshots").iterdir())] == [
        "step-000000", "step-000010", "step-000012"
    ]
    # the picker lists the run's best/ and latest/, not its snapshots; they are there when asked for
    assert sorted(i.path.name for i in list_checkpoints(tmp_path)) == ["best", "latest"]
    assert len(list_checkpoints(tmp_path, include_snapshots=True)) == 5
    # step 0 holds the initial weights: a snapshot differs from the next one
    first, second = load_model(snapshots[0].path), load_model(snapshots[1].path)
    assert not torch.equal(first.embed_tokens.weight, second.embed_tokens.weight)
    # smaller than the fp32 checkpoint, and what a viewer reads off it is the same
    size = (snapshots[-1].path / "model.safetensors").stat().st_size
    assert size < 0.6 * (run / "latest" / "model.safetensors").stat().st_size
    tokenizer = load_tokenizer()
    full = score_text(load_model(run / "latest"), tokenizer, STORY)
    kept = score_text(load_model(snapshots[-1].path), tokenizer, STORY)
    assert max(abs(a - b) for a, b in zip(full.probabilities, kept.probabilities, strict=True)) < 5e-3
    assert kept.loss == pytest.approx(full.loss, abs=0.01)


def test_scoring_counts_every_token_and_byte(tmp_path):
    from app_helpers import playground_config

    from slm import build_model

    model = build_model(playground_config(), seed=0)
    tokenizer = load_tokenizer()
    text = "Lily saw a cat. Café!"
    scored = score_text(model, tokenizer, text)
    assert len(scored.log_probs) == len(tokenizer.encode(text))  # the first token is scored too
    assert scored.num_bytes == len(text.encode("utf-8"))
    assert scored.bits_per_byte == pytest.approx(-sum(scored.log_probs) / math.log(2) / len(text.encode()))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app over a run trained for real (on the shared TinyStories text where present)."""
    root = tmp_path_factory.mktemp("watch-app")
    checkpoints, data = root / "checkpoints", root / "data"
    data.mkdir(parents=True)
    if TINYSTORIES_TRAIN.is_file():
        text = data / "stories.txt"
        text.write_text(TINYSTORIES_TRAIN.read_text()[:400_000])
    else:
        text = write_raw_txt(data / "stories.txt", make_stories(300))
    config = quick_config(root, text, max_steps=30, eval_every=30, sample_tokens=0, lr=3e-3,
                          out=str(checkpoints / "lesson"))
    train(config)
    with running_app(checkpoints, data) as (url, _manager):
        yield {"url": url, "checkpoints": checkpoints}


@pytest.fixture(scope="module")
def client(app):
    return Client(app["url"], verbose=False)


def test_watch_learning_returns_the_snapshots_in_order_with_a_falling_loss(client):
    result = client.predict("lesson", STORY, api_name="/watch_learning")
    assert result["run"] == "lesson"
    snapshots = result["snapshots"]
    assert [s["step"] for s in snapshots] == [0, 10, 20, 30]
    assert [s["tokens_seen"] for s in snapshots] == [s["step"] * 4 * 32 for s in snapshots]
    losses = [s["loss"] for s in snapshots]
    assert losses[0] > 10  # random weights: about ln(50257) = 10.8 nats per token
    assert losses[-1] < losses[0] - 2
    assert all(later < earlier + 0.05 for earlier, later in itertools.pairwise(losses))
    n = len(result["tokens"])
    assert n == 31  # the model's context is 32 tokens: an end-of-text token and the text's first 31
    assert result["dropped_tokens"] == len(load_tokenizer().encode(STORY)) - 31
    for snap in snapshots:
        assert len(snap["probabilities"]) == n
        assert snap["loss"] == pytest.approx(-sum(math.log(p) for p in snap["probabilities"]) / n, rel=1e-4)
        assert 0 < snap["bits_per_byte"] < snap["loss"]


def test_compare_a_checkpoint_with_itself_is_all_zeros(client):
    result = client.predict("lesson/latest", "lesson/latest", STORY, api_name="/compare_checkpoints")
    assert len(result["log_prob_change"]) == len(result["tokens"]) > 20
    assert all(d == 0 for d in result["log_prob_change"])
    assert result["improved"] == result["worsened"] == 0


def test_compare_an_early_and_a_late_snapshot_shows_improvement(client):
    result = client.predict("lesson/snapshots/step-000000", "lesson/snapshots/step-000030", STORY,
                            api_name="/compare_checkpoints")
    n = len(result["tokens"])
    assert result["improved"] > 0.8 * n
    assert result["loss_b"] < result["loss_a"] - 2
    top = result["most_changed"]
    assert len(top) == 10
    assert abs(top[0]["delta"]) == pytest.approx(max(abs(d) for d in result["log_prob_change"]))
    assert [abs(c["delta"]) for c in top] == sorted((abs(c["delta"]) for c in top), reverse=True)


def test_names_outside_the_checkpoint_folder_are_refused(client, app):
    with pytest.raises(AppError, match="outside the folders"):
        client.predict("../../..", STORY, api_name="/watch_learning")
    with pytest.raises(AppError, match="outside the folders"):
        client.predict("/etc", "lesson/latest", STORY, api_name="/compare_checkpoints")
    with pytest.raises(AppError, match="no snapshots"):
        client.predict("lesson/latest", STORY, api_name="/watch_learning")
    with pytest.raises(AppError, match="Enter a text"):
        client.predict("lesson", "  ", api_name="/watch_learning")
    # the picker is not cluttered by snapshots
    keys = [e["key"] for e in client.predict(api_name="/list_checkpoints")]
    assert "lesson/latest" in keys and not any("snapshots" in k for k in keys)
