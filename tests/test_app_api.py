"""The playground through its public API: a real Gradio server on a free port, called with gradio_client."""

from __future__ import annotations

import html
import itertools
import math
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch
from app_helpers import CHECKPOINT_KEY, make_checkpoint, playground_config, running_app, write_stories
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from slm import build_model, count_parameters, generate, load_model, load_tokenizer
from slm.hf import save_hf
from slm.plots import percent
from ui.models import UNTRAINED
from ui.train_tab import FILE_SOURCE

PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    checkpoints, data = root / "checkpoints", root / "data"
    make_checkpoint(checkpoints, playground_config())
    data.mkdir()
    with running_app(checkpoints, data) as (url, _manager):
        yield {"url": url, "checkpoints": checkpoints, "data": data, "root": root}


@pytest.fixture(scope="module")
def client(app):
    return Client(app["url"], verbose=False)


@pytest.fixture(scope="module")
def model(app):
    return load_model(app["checkpoints"] / CHECKPOINT_KEY)


def still_up(client: Client) -> None:
    assert CHECKPOINT_KEY in [e["key"] for e in client.predict(api_name="/list_checkpoints")]


def test_list_checkpoints(client):
    entries = client.predict(api_name="/list_checkpoints")
    first = entries[0]
    assert first["key"] == CHECKPOINT_KEY
    assert first["step"] == 120 and first["val_loss"] == pytest.approx(6.25)
    assert first["parameters"] == count_parameters(playground_config()).total
    assert first["label"].startswith("small-run · best (step 120, val 6.250)") and first["default"]
    assert entries[-1]["key"] == UNTRAINED and entries[-1]["format"] == "untrained"


def test_generate_streams_token_by_token(client, model):
    job = client.submit(PROMPT, 12, 0.8, 40, 0.95, 7, api_name="/generate")
    texts = [out[0] for out in job]
    final_text, final_stats = job.result()
    assert texts[-1] == final_text
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # only ever grows
    assert len({len(t) for t in texts}) >= 6  # it arrived piece by piece, not all at once
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(PROMPT)
    expected = generate(model, ids, 12, temperature=0.8, top_k=40, top_p=0.95, seed=7,
                        stop_token_ids=[tokenizer.eot_id])
    expected = [t for t in expected if t != tokenizer.eot_id]
    assert final_text == PROMPT + tokenizer.decode(expected)
    assert "tokens/s" in final_stats and "done" in final_stats


def test_greedy_and_sampled_side_by_side(client, model):
    greedy_text, sampled_text = client.predict(PROMPT, 10, 1.0, 0, 1.0, 3, api_name="/compare")
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(PROMPT)
    greedy = [t for t in generate(model, ids, 10, temperature=0, stop_token_ids=[tokenizer.eot_id])
              if t != tokenizer.eot_id]
    sampled = [t for t in generate(model, ids, 10, temperature=1.0, seed=3, stop_token_ids=[tokenizer.eot_id])
               if t != tokenizer.eot_id]
    assert greedy_text == PROMPT + tokenizer.decode(greedy)
    assert sampled_text == PROMPT + tokenizer.decode(sampled)
    assert greedy_text != sampled_text


def test_inspect_matches_a_direct_model_call(client, model):
    text = "Once upon a time, there was a dog. The dog liked to run."
    highlighted, details = client.predict(text, 5, api_name="/inspect")
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(text)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids]))[0].float(), -1)
    expected = [float(probs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert [h["token"] for h in highlighted] == tokenizer.token_strings(ids)
    assert highlighted[0]["class_or_confidence"] is None
    assert [h["class_or_confidence"] for h in highlighted[1:]] == pytest.approx(expected, rel=1e-4)
    assert details["token_ids"] == ids
    assert details["probabilities"][1:] == pytest.approx(expected, rel=1e-4)
    top = torch.topk(probs[-1], 5)
    assert [c["token_id"] for c in details["next_token"]["candidates"]] == top.indices.tolist()
    entropy = float(torch.distributions.Categorical(probs=probs[-1]).entropy())
    assert details["next_token"]["entropy"] == pytest.approx(entropy, rel=1e-4)

    # a chosen position: candidates, entropy and the logit lens
    bars, lens, info = client.predict(4, api_name="/inspect_position")
    assert bars["type"] == "matplotlib" and lens["type"] == "matplotlib"
    entropy_4 = float(torch.distributions.Categorical(probs=probs[4]).entropy())
    assert f"entropy {entropy_4:.2f} nats" in info
    heatmap, grid = client.predict(0, 1, api_name="/attention")
    assert heatmap["plot"].startswith("data:image") and grid["plot"].startswith("data:image")
    with pytest.raises(AppError, match="position must be at most"):
        client.predict(len(ids), api_name="/inspect_position")
    with pytest.raises(AppError, match="layer must be at most"):
        client.predict(7, 0, api_name="/attention")


def test_step_by_step(client, model):
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(PROMPT)
    story, chart, _, info = client.predict(PROMPT, 1.0, 0, 1.0, api_name="/step_start")
    assert [s["token"] for s in story] == tokenizer.token_strings(ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1]
    probs = torch.softmax(logits, -1)
    top = torch.topk(logits, 8).indices.tolist()
    # the distribution is drawn by the browser: HTML bars, most likely first, with the model's percentages
    tokens_shown = re.findall(r'class="dist-token">([^<]*)<', chart)
    assert tokens_shown == [html.escape(t.replace(" ", "␣").replace("\n", "↵")) for t in tokenizer.token_strings(top)]
    assert percent(float(probs[top[0]])) in chart
    second = top[1]
    story, _, _, info = client.predict(PROMPT, 1.0, 0, 1.0, str(second), api_name="/step_pick")
    # coloured by the probability the token had when chosen; the choice is announced with it and its rank
    assert story[-1]["token"] == tokenizer.token_strings([second])[0]
    assert story[-1]["class_or_confidence"] == pytest.approx(float(probs[second]), rel=1e-4)
    assert f"{percent(float(probs[second]))}, rank 2" in info and info.startswith("You chose")
    assert "1 token added" in info
    story, _, _, info = client.predict(PROMPT, 0.0, 0, 1.0, 0, api_name="/step_sample")  # temperature 0: greedy
    with torch.no_grad():
        greedy_logits = model(torch.tensor([[*ids, second]]))[0, -1]
    greedy = int(greedy_logits.argmax())
    assert story[-1]["token"] == tokenizer.token_strings([greedy])[0]
    assert story[-1]["class_or_confidence"] == 1.0  # greedy: the sampler gave it all the mass
    assert info.startswith("Drew") and "100.0%, rank 1" in info
    assert f"the model alone: {percent(float(torch.softmax(greedy_logits, -1)[greedy]))}" in info
    # coloured by kind instead, when the presenter prefers
    story, _, _, info = client.predict(PROMPT, 1.0, 0, 1.0, False, api_name="/step_undo")
    assert len(story) == len(ids) + 1 and story[-1]["class_or_confidence"] == "chosen by you"
    assert info.startswith("Took back")


def test_two_sessions_do_not_share_state(app):
    alice, bob = Client(app["url"], verbose=False), Client(app["url"], verbose=False)
    alice.predict(UNTRAINED, api_name="/select_model")
    _, alice_details = alice.predict("Hello there", 3, api_name="/inspect")
    _, bob_details = bob.predict("Good night", 3, api_name="/inspect")
    assert alice_details["model"] == UNTRAINED
    assert bob_details["model"] == CHECKPOINT_KEY  # the default: the newest checkpoint
    alice_story = alice.predict("Alice's story", 1.0, 0, 1.0, api_name="/step_start")[0]
    bob_story = bob.predict("Bob", 1.0, 0, 1.0, api_name="/step_start")[0]
    alice_after = alice.predict("ignored", 1.0, 0, 1.0, 0, api_name="/step_sample")[0]
    assert alice_after[: len(alice_story)] == alice_story
    assert len(alice_after) == len(alice_story) + 1
    assert bob.predict("ignored", 1.0, 0, 1.0, api_name="/step_undo")[0] == bob_story
    # each session's inspection stays its own
    assert "Hello" in alice.predict(0, api_name="/inspect_position")[2]
    assert "Good" in bob.predict(0, api_name="/inspect_position")[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hi", 10, 1.0, -3, 0.9, 0), "minimum value 0"),
        (("hi", 10, 1.0, 5, 1.5, 0), "maximum value 1"),
        (("hi", 0, 1.0, 5, 0.9, 0), "minimum value 1"),
        (("hi", 5000, 1.0, 5, 0.9, 0), "maximum value 1024"),
        (("hi", 10, 1.0, 5, 0.0, 0), "minimum value 0.05"),
    ],
)
def test_bad_generation_settings_get_clear_errors(client, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/generate")
    still_up(client)


def test_nan_is_refused_with_a_message(app, client):
    """NaN cannot be sent by gradio_client (strict JSON), but a raw HTTP request can send it."""
    url = app["url"]
    body = '{"data": ["hi", 10, NaN, 5, 0.9, 0, false]}'  # the last: the chat template toggle
    event = httpx.post(f"{url}gradio_api/call/generate", content=body,
                       headers={"content-type": "application/json"}).json()["event_id"]
    answer = httpx.get(f"{url}gradio_api/call/generate/{event}", timeout=30).text
    assert "event: error" in answer and "temperature must be a finite number" in answer
    assert "Traceback" not in answer
    still_up(client)


def test_awkward_prompts(client, model):
    # an empty prompt starts from the end-of-text token
    text, stats = client.predict("", 5, 0.0, 0, 1.0, 0, api_name="/generate")
    tokenizer = load_tokenizer()
    greedy = generate(model, [tokenizer.eot_id], 5, temperature=0, stop_token_ids=[tokenizer.eot_id])
    assert text == tokenizer.decode([t for t in greedy if t != tokenizer.eot_id])
    assert "prompt 1 tokens" in stats
    # a prompt longer than the context keeps its last tokens and says so
    long_prompt = "The cat sat on the mat. " * 30
    text, stats = client.predict(long_prompt, 10, 0.0, 0, 1.0, 0, api_name="/generate")
    context = model.config.context_length
    kept = context - 10
    dropped = len(tokenizer.encode(long_prompt)) - kept
    assert f"prompt {kept} tokens (its first {dropped} tokens dropped to fit the context)" in stats
    ids = tokenizer.encode(long_prompt)[-kept:]
    expected = [t for t in generate(model, ids, 10, temperature=0, stop_token_ids=[tokenizer.eot_id])
                if t != tokenizer.eot_id]
    assert text == long_prompt + tokenizer.decode(expected)
    # prompt and new tokens do not fit together: the prompt keeps half the context, the new tokens get the rest
    text, stats = client.predict(long_prompt, 60, 0.0, 0, 1.0, 0, api_name="/generate")
    assert f"prompt {context // 2} tokens" in stats
    # more new tokens than the context holds
    text, stats = client.predict("Hi", 500, 0.0, 0, 1.0, 0, api_name="/generate")
    assert "done" in stats
    with pytest.raises(AppError, match="Enter some text"):
        client.predict("   ", 5, api_name="/inspect")
    still_up(client)


def test_paths_outside_the_allowed_folders_are_refused(app, client):
    outside = app["root"] / "elsewhere"
    make_checkpoint(outside, playground_config(), key="ckpt")
    for path in (str(outside / "ckpt"), "../elsewhere/ckpt", "/etc"):
        with pytest.raises(AppError, match="outside the folders this app may read"):
            client.predict(path, api_name="/select_model")
    # a symlink inside the checkpoint folder that points outside is refused too
    (app["checkpoints"] / "sneaky").symlink_to(outside / "ckpt")
    with pytest.raises(AppError, match="outside the folders this app may read"):
        client.predict("sneaky", api_name="/select_model")
    still_up(client)


def test_missing_and_corrupt_checkpoints(app, client):
    with pytest.raises(AppError, match="no checkpoint at"):
        client.predict("nothing/here", api_name="/select_model")
    broken = make_checkpoint(app["checkpoints"], playground_config(), key="broken/best")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    try:
        with pytest.raises(AppError, match="not a readable safetensors file"):
            client.predict("broken/best", api_name="/select_model")
    finally:
        shutil.rmtree(broken.parent)  # later sessions would get it as the newest checkpoint
    with pytest.raises(AppError, match=r"Could not download .* Hub"):
        client.predict("someone/some-model", api_name="/load_hub")
    with pytest.raises(AppError, match="not a Hub repository id"):
        client.predict("../../etc", api_name="/load_hub")
    # the session still has its working model
    text, _ = client.predict(PROMPT, 3, 0.0, 0, 1.0, 0, api_name="/generate")
    assert text.startswith(PROMPT)
    assert math.isfinite(client.predict(PROMPT, 3, api_name="/inspect")[1]["entropy"][0])


def test_a_hub_repo_id_downloads_into_the_checkpoint_folder_and_loads(app, client, monkeypatch):
    """The download itself is replaced (the hub is unreachable here); the folder it writes is real.

    It holds a transformers Gemma 3 checkpoint as `slm.hf` writes it, downloaded into the checkpoint
    folder, loaded through `slm.load_model` and used for generation.
    """
    import huggingface_hub

    source = build_model(playground_config(), seed=5)
    calls = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns, **kwargs):
        calls.append((repo_id, Path(local_dir), allow_patterns))
        save_hf(source, local_dir, with_tokenizer=False)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    session = Client(app["url"], verbose=False)
    try:
        description = session.predict("someone/tiny-gemma", api_name="/load_hub")
        assert calls[0][0] == "someone/tiny-gemma"
        assert calls[0][1] == app["checkpoints"] / "hub" / "someone--tiny-gemma"
        assert "*.safetensors" in calls[0][2] and not any(p.endswith((".bin", ".pt")) for p in calls[0][2])
        assert "hub/someone--tiny-gemma" in description
        text, _ = session.predict(PROMPT, 6, 0.0, 0, 1.0, 0, api_name="/generate")
        tokenizer = load_tokenizer()
        expected = generate(source.eval(), tokenizer.encode(PROMPT), 6, temperature=0,
                            stop_token_ids=[tokenizer.eot_id])
        assert text == PROMPT + tokenizer.decode([t for t in expected if t != tokenizer.eot_id])
    finally:
        shutil.rmtree(app["checkpoints"] / "hub", ignore_errors=True)  # later sessions would default to it

# ----- training through the API -------------------------------------------------------------------
# A real job: the app's TrainingManager runs `tiny` in a subprocess on synthetic stories, on the CPU.
ACTIVE = ("preparing", "running", "stopping")


@pytest.fixture(scope="module")
def training_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-app")
    write_stories(root / "data" / "stories.txt")
    with running_app(root / "checkpoints", root / "data") as (url, manager):
        yield {"url": url, "root": root, "manager": manager}


def start_args(steps: int) -> tuple:
    # preset, data source, stories, data file, steps, batch size, learning rate, context length, minutes (0: none)
    return ("tiny", FILE_SOURCE, 0, "stories.txt", steps, 2, 3e-3, 32, 0)


def wait_for(client: Client, done, timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.predict(api_name="/training_status")
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def test_training_runs_to_the_end_and_its_checkpoint_appears(training_app):
    client = Client(training_app["url"], verbose=False)
    assert client.predict(api_name="/training_status")["state"] == "idle"
    assert client.predict(api_name="/stop_training") == "No training run is going."
    # an uploaded text file is copied into the data folder (under a safe name) and trained on
    upload = write_stories(training_app["root"] / "elsewhere" / "my stories!.txt", count=200, seed=1)
    data_file, source = client.predict(handle_file(str(upload)), api_name="/upload_data")
    assert (data_file, source) == ("uploads/my_stories.txt", FILE_SOURCE)
    assert (training_app["root"] / "data" / data_file).read_text() == upload.read_text()
    message = client.predict("tiny", FILE_SOURCE, 0, data_file, 6, 2, 3e-3, 32, 0, api_name="/start_training")
    assert message.startswith("Started run")
    with pytest.raises(AppError, match="already going"):  # one job at a time
        client.predict(*start_args(6), api_name="/start_training")
    # generating while the job runs works (the untrained model: nothing is saved yet)
    text, stats = client.predict(PROMPT, 4, 0.0, 0, 1.0, 0, api_name="/generate")
    assert text.startswith(PROMPT) and "done" in stats
    status = wait_for(client, lambda s: s["state"] not in ACTIVE)
    assert status["state"] == "finished", status["message"]
    assert status["step"] == status["max_steps"] == 6
    assert status["train_loss"] is not None and status["device"].startswith("CPU")
    run = Path(status["run_dir"]).name
    entries = {e["key"]: e for e in client.predict(api_name="/list_checkpoints")}
    assert f"{run}/latest" in entries
    assert entries[f"{run}/latest"]["step"] == 6 and entries[f"{run}/latest"]["preset"] == "tiny"
    client.predict(f"{run}/latest", api_name="/select_model")
    text, _ = client.predict(PROMPT, 4, 0.0, 0, 1.0, 0, api_name="/generate")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)


def test_stop_in_the_middle_then_resume(training_app):
    client = Client(training_app["url"], verbose=False)
    client.predict(*start_args(100_000), api_name="/start_training")
    status = wait_for(client, lambda s: (s["state"] == "running" and s["step"] >= 2) or s["state"] == "failed")
    assert status["state"] == "running", status["message"]
    assert client.predict(api_name="/stop_training").startswith("Stopping")
    status = wait_for(client, lambda s: s["state"] not in ACTIVE)
    assert status["state"] == "stopped", status["message"]
    assert 2 <= status["step"] < 100_000
    run = Path(status["run_dir"]).name
    entries = {e["key"]: e for e in client.predict(api_name="/list_checkpoints")}
    assert entries[f"{run}/latest"]["step"] == status["step"]  # the stop saved where it stopped
    # resume to a few steps further
    target = status["step"] + 3
    assert "Resumed" in client.predict(run, target, api_name="/resume_training")
    status = wait_for(client, lambda s: s["state"] not in ACTIVE)
    assert status["state"] == "finished", status["message"]
    assert status["step"] == target
    # refused: a run folder outside the checkpoint folder, a data file outside the data folder
    with pytest.raises(AppError, match="outside the folders"):
        client.predict("../../", 5, api_name="/resume_training")
    with pytest.raises(AppError, match="outside the folders"):
        client.predict("tiny", FILE_SOURCE, 0, "/etc/passwd", 5, 2, 1e-3, 32, api_name="/start_training")


def _greedy_text(model, steps: int = 6) -> str:
    tokenizer = load_tokenizer()
    ids = generate(model, tokenizer.encode(PROMPT), steps, temperature=0, stop_token_ids=[tokenizer.eot_id])
    return PROMPT + tokenizer.decode([t for t in ids if t != tokenizer.eot_id])


@pytest.fixture(scope="module")
def runs_of_different_length(tmp_path_factory):
    """A 400-step run, then a newer 5-step test run (whose checkpoints are the newest on disk)."""
    root = tmp_path_factory.mktemp("runs")
    checkpoints = root / "checkpoints"
    config = playground_config()
    make_checkpoint(checkpoints, config, "long-run/latest", step=400, seed=1, val_loss=3.1)
    make_checkpoint(checkpoints, config, "long-run/best", step=400, seed=2, val_loss=2.9, val_bpb=1.21)
    time.sleep(0.05)  # the test run's files are strictly newer
    make_checkpoint(checkpoints, config, "test-run/best", step=5, seed=3, val_loss=10.4)
    make_checkpoint(checkpoints, config, "test-run/latest", step=5, seed=4, val_loss=10.4)
    (root / "data").mkdir()
    return root


def test_a_new_visitor_gets_the_best_checkpoint_of_the_last_real_run(runs_of_different_length):
    root = runs_of_different_length
    with running_app(root / "checkpoints", root / "data") as (url, _):
        client = Client(url, verbose=False)
        entries = client.predict(api_name="/list_checkpoints")
        keys = [e["key"] for e in entries]
        # each run once, newest first, best before latest, told apart in the label with steps, loss and bpb
        assert keys == ["test-run/best", "test-run/latest", "long-run/best", "long-run/latest", UNTRAINED]
        labels = {e["key"]: e["label"] for e in entries}
        assert labels["long-run/best"].startswith("long-run · best (step 400, val 2.900, 1.21 bpb)")
        assert labels["long-run/latest"].startswith("long-run · latest (step 400, val 3.100)")
        assert [e["key"] for e in entries if e["default"]] == ["long-run/best"]
        # a new visitor who never touched the picker generates with that model
        text, _ = client.predict(PROMPT, 6, 0.0, 0, 1.0, 0, api_name="/generate")
        assert text == _greedy_text(load_model(root / "checkpoints" / "long-run/best"))
        assert text != _greedy_text(load_model(root / "checkpoints" / "test-run/best"))


def test_the_configured_default_model_wins(runs_of_different_length):
    root = runs_of_different_length
    with running_app(root / "checkpoints", root / "data", default_model="test-run/latest") as (url, _):
        client = Client(url, verbose=False)
        assert [e["key"] for e in client.predict(api_name="/list_checkpoints") if e["default"]] == ["test-run/latest"]
        text, _ = client.predict(PROMPT, 6, 0.0, 0, 1.0, 0, api_name="/generate")
        assert text == _greedy_text(load_model(root / "checkpoints" / "test-run/latest"))


def test_public_demo_refuses_training_uploads_and_downloads(tmp_path):
    checkpoints, data = tmp_path / "checkpoints", tmp_path / "data"
    make_checkpoint(checkpoints, playground_config())
    write_stories(data / "stories.txt")
    with running_app(checkpoints, data, demo=True) as (url, manager):
        client = Client(url, verbose=False)
        for call in (
            lambda: client.predict(*start_args(5), api_name="/start_training"),
            lambda: client.predict("small-run", 10, api_name="/resume_training"),
            lambda: client.predict(api_name="/stop_training"),
        ):
            with pytest.raises(AppError, match=r"public demo.*training is switched off"):
                call()
        with pytest.raises(AppError, match=r"public demo.*uploading files is switched off"):
            client.predict(handle_file(str(data / "stories.txt")), api_name="/upload_data")
        with pytest.raises(AppError, match=r"public demo.*downloading models from the Hugging Face Hub"):
            client.predict("someone/some-model", api_name="/load_hub")
        assert manager.status().state == "idle" and not (data / "uploads").exists()
        assert not (checkpoints / "hub").exists() and sorted(p.name for p in checkpoints.iterdir()) == ["small-run"]
        # generation, step by step and inspection work for everyone
        text, stats = client.predict(PROMPT, 5, 0.0, 0, 1.0, 0, api_name="/generate")
        assert text.startswith(PROMPT) and "done" in stats
        assert client.predict(PROMPT, 1.0, 0, 1.0, 0, api_name="/step_sample")[3].startswith("Drew")
        assert client.predict("The cat sat.", 5, api_name="/inspect")[1]["tokens"]


def test_settings_come_from_the_environment_and_flags(monkeypatch, tmp_path):
    import app

    monkeypatch.setenv("SLM_CHECKPOINTS", str(tmp_path / "ckpt"))
    monkeypatch.setenv("SLM_DATA_DIR", str(tmp_path / "texts"))
    monkeypatch.setenv("SLM_DEFAULT_MODEL", "run/best")
    monkeypatch.setenv("SLM_DEMO", "1")
    settings = app.settings_from_args(app.parse_args([]))
    assert settings.checkpoints_dir == (tmp_path / "ckpt").resolve()
    assert settings.data_dir == (tmp_path / "texts").resolve()
    assert settings.default_model == "run/best" and settings.demo and not settings.zero_gpu
    flags = app.settings_from_args(app.parse_args(["--default-model", "other/latest", "--no-demo"]))
    assert flags.default_model == "other/latest" and not flags.demo
