"""Attacks and careless use, through the real app (gradio_client) and the real CLI (subprocesses).

Each test is one class of the table in tests/README.md: files outside the allowed folders reached
through symlinks, files on disk trusted as if the app had written them, sizes taken on trust, saves
that can lose `latest/`, silent replacement, and raw messages.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from app_helpers import CHECKPOINT_KEY, free_port, make_checkpoint, playground_config, write_stories
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from training_helpers import PYTHON, REPO, quick_config, stories_file, subprocess_env

import slm
from slm.checkpoint import CheckpointError, read_training_state, recover_directory
from slm.config import ModelConfig
from slm.jobs import TrainingManager
from slm.loading import scan_checkpoints
from ui.models import UNTRAINED

TRAIN = str(REPO / "train.py")
PROMPT = "Once upon a time, there was a little"


# ----- one app for the module: a checkpoint folder with good, damaged and hostile entries -------------------
def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Folders as an attacker or a careless user might leave them, beside one good checkpoint."""
    root = tmp_path_factory.mktemp("hostile")
    checkpoints, data, outside = root / "checkpoints", root / "data", root / "outside"
    outside.mkdir()
    good = make_checkpoint(checkpoints, playground_config())
    # a malformed config.json, a config of the wrong types, a transformers config missing its sizes
    write_json(checkpoints / "broken-json" / "config.json", "{not json")
    (checkpoints / "broken-json" / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    write_json(checkpoints / "wrong-types" / "config.json", {"num_layers": "many"})
    write_json(checkpoints / "hf-missing" / "config.json", {"model_type": "gemma3_text"})
    # metadata of the wrong types beside good weights: the checkpoint stays usable, the bad fields are dropped
    meta = make_checkpoint(checkpoints, playground_config(), key="odd-metadata", step=5)
    write_json(meta / "metadata.json", {"step": "five", "val_loss": "low", "preset": ["x"]})
    # absurd sizes: 30 million layers; and a 4M vocabulary
    write_json(checkpoints / "huge-layers" / "config.json", {**playground_config().to_dict(), "num_layers": 30_000_000,
                                                             "layer_types": []})
    (checkpoints / "huge-layers" / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    # a checkpoint whose weights are a symlink to a file outside the checkpoint folder
    other = make_checkpoint(outside, playground_config(init_std=0.02), key="secret")
    linked = checkpoints / "linked"
    linked.mkdir()
    (linked / "config.json").write_text((other / "config.json").read_text())
    (linked / "model.safetensors").symlink_to(other / "model.safetensors")
    with running(checkpoints, data) as url:
        yield {"url": url, "root": root, "checkpoints": checkpoints, "data": data, "outside": outside}


def running(checkpoints: Path, data: Path, max_upload_mb: float | None = None):
    from contextlib import contextmanager

    from ui import build_app, launch_options
    from ui.common import AppSettings

    @contextmanager
    def serve():
        checkpoints.mkdir(parents=True, exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        extra = {} if max_upload_mb is None else {"max_upload_mb": max_upload_mb}
        settings = AppSettings(checkpoints.resolve(), data.resolve(), torch.device("cpu"), torch.float32, **extra)
        manager = TrainingManager(runs_root=settings.checkpoints_dir)
        demo = build_app(settings, manager)
        demo.queue(default_concurrency_limit=2)
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                quiet=True, **launch_options())
        try:
            yield url
        finally:
            if manager.stop():
                manager.wait(timeout=60)
            demo.close()

    return serve()


@pytest.fixture(scope="module")
def client(hostile):
    return Client(hostile["url"], verbose=False)


def entries_by_key(client: Client) -> dict[str, dict]:
    return {e["key"]: e for e in client.predict(api_name="/list_checkpoints")}


# ----- one bad file takes nothing down ------------------------------------------------------------------------
def test_malformed_configs_are_listed_as_unreadable_beside_the_good_ones(client):
    entries = entries_by_key(client)
    assert entries[CHECKPOINT_KEY]["format"] == "slm" and entries[CHECKPOINT_KEY]["step"] == 120
    for key, reason in [("broken-json", "not valid JSON"), ("wrong-types", "positive integer"),
                        ("hf-missing", "not a valid Gemma 3 config"), ("huge-layers", "at most 512"),
                        ("linked", "symbolic link")]:
        assert entries[key]["format"] == "unreadable", key
        assert reason in entries[key]["reason"], (key, entries[key]["reason"])
        assert "unreadable" in entries[key]["label"]
    assert list(entries)[-1] == UNTRAINED
    # metadata of the wrong types: the checkpoint is listed and loads; only the bad fields are missing
    assert entries["odd-metadata"]["format"] == "slm" and entries["odd-metadata"]["step"] is None
    # and the app generates (from the default, a good checkpoint)
    text, stats = client.predict(PROMPT, 4, 0.0, 0, 1.0, 0, api_name="/generate")
    assert text.startswith(PROMPT) and "done" in stats


def test_choosing_an_unreadable_checkpoint_says_why(client):
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict("broken-json", api_name="/select_model")
    with pytest.raises(AppError, match="symbolic link"):
        client.predict("linked", api_name="/select_model")
    assert CHECKPOINT_KEY in entries_by_key(client)  # still up


def test_symlinked_checkpoint_files_are_refused(hostile):
    with pytest.raises(CheckpointError, match=r"symbolic link .* outside the checkpoint folder"):
        slm.load_model(hostile["checkpoints"] / "linked")


def test_absurd_sizes_are_refused_before_anything_is_allocated(tmp_path):
    good = make_checkpoint(tmp_path, playground_config(), key="good")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for field, value, message in [("num_layers", 30_000_000, "at most 512"), ("vocab_size", 4_000_000, "at most"),
                                  ("hidden_size", -3, "positive integer")]:
        write_json(good / "config.json", {**playground_config().to_dict(), field: value, "layer_types": []})
        with pytest.raises(CheckpointError, match=message):
            slm.load_model(good)
    # within every bound, but 64x the parameters the weights hold: refused from the safetensors header
    write_json(good / "config.json", playground_config(vocab_size=1_000_000, hidden_size=4096).to_dict())
    with pytest.raises(CheckpointError, match="do not belong together"):
        slm.load_model(good)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500  # the 4B-parameter model (16 GB) was never built


# ----- prompts longer than the context, in every tab ------------------------------------------------------------
LONG_PROMPT = "The cat sat on the mat and looked at the moon. " * 20_000  # ~240k tokens, ~1 MB


def test_long_prompts_are_trimmed_in_every_tab(client):
    context = playground_config().context_length
    _, stats = client.predict(LONG_PROMPT, 4, 0.0, 0, 1.0, 0, api_name="/generate")
    assert "dropped to fit the context" in stats
    highlighted, _ = client.predict(LONG_PROMPT, 3, api_name="/inspect")
    assert 0 < len(highlighted) <= context
    story = client.predict(LONG_PROMPT, 1.0, 0, 1.0, api_name="/step_start")[0]
    tokens = [segment["token"] for segment in story]
    assert len(tokens) == context  # the last `context` tokens, not a quarter million
    assert "".join(tokens).endswith("looked at the moon. ")


# ----- uploads ------------------------------------------------------------------------------------------------
def test_uploads_never_follow_a_symlink_and_never_replace_a_file(hostile, client):
    uploads, outside = hostile["data"] / "uploads", hostile["outside"]
    uploads.mkdir(parents=True, exist_ok=True)
    victim = outside / "victim.txt"
    victim.write_text("precious")
    (uploads / "stories.txt").symlink_to(victim)  # planted: a name an upload will use
    source = write_stories(hostile["root"] / "incoming" / "stories.txt", count=5)
    data_file, _ = client.predict(handle_file(str(source)), api_name="/upload_data")
    assert data_file == "uploads/stories-2.txt"
    assert victim.read_text() == "precious"
    assert (hostile["data"] / data_file).read_text() == source.read_text()
    again, _ = client.predict(handle_file(str(source)), api_name="/upload_data")  # same name again: a new one
    assert again == "uploads/stories-3.txt" and (hostile["data"] / data_file).read_text() == source.read_text()


def test_uploads_above_the_size_limit_are_refused(tmp_path):
    with running(tmp_path / "checkpoints", tmp_path / "data", max_upload_mb=0.01) as url:
        big = tmp_path / "big.txt"
        big.write_text("Once upon a time. " * 2000)  # ~36 kB
        with pytest.raises(AppError, match=r"limited to 0.01 MB .*--max-upload-mb"):
            Client(url, verbose=False).predict(handle_file(str(big)), api_name="/upload_data")
    assert not (tmp_path / "data" / "uploads" / "big.txt").exists()


# ----- run records and run files --------------------------------------------------------------------------------
def fake_resumable_run(run_dir: Path, config_values: dict) -> Path:
    run_dir.mkdir(parents=True)
    write_json(run_dir / "run.json", config_values)
    write_json(run_dir / "latest" / "training_state.json", {"format": 1})
    return run_dir


def test_a_run_record_pointing_outside_is_refused(hostile, client, tmp_path):
    outside = hostile["outside"]
    secret = write_stories(outside / "private.txt", count=5)
    values = quick_config(tmp_path, secret, cache_dir=str(outside / "cache")).to_dict()
    run = fake_resumable_run(hostile["checkpoints"] / "planted-run", {**values, "out": None})
    with pytest.raises(AppError, match=r"refused: .*outside the folders"):
        client.predict("planted-run", 10, api_name="/resume_training")
    assert not (outside / "cache").exists()
    # the worker itself refuses it too (a run.json edited after the app checked it)
    result = subprocess.run(
        [PYTHON, "-m", "slm.jobs", str(run), "--allow", str(hostile["checkpoints"]), "--allow", str(hostile["data"])],
        capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120,
    )
    assert result.returncode == 2 and "outside the folders" in result.stderr and "Traceback" not in result.stderr
    assert not (outside / "cache").exists()


def test_symlinked_job_and_log_files_are_replaced_not_followed(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    stories = stories_file(data)
    run = fake_resumable_run(runs / "run", quick_config(tmp_path, stories, cache_dir=str(data / "cache"),
                                                       out=str(runs / "run")).to_dict())
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("job.json", "worker.log", "metrics.jsonl"):
        (outside / name).write_text("precious")
        (run / name).symlink_to(outside / name)
    manager = TrainingManager(runs, allowed_roots=[data])
    manager.resume(run, max_steps=10)
    status = manager.wait(timeout=120)  # its training state is fake: the job fails, with a message
    assert status.state == "failed" and "damaged" in status.message, status.message
    for name in ("job.json", "worker.log", "metrics.jsonl"):
        assert (outside / name).read_text() == "precious", name
    for name in ("job.json", "worker.log"):
        assert not (run / name).is_symlink(), name
    assert json.loads((run / "job.json").read_text())["pid"] > 0


# ----- saves that are never missing -----------------------------------------------------------------------------
def test_recovery_finishes_or_rolls_back_an_interrupted_save(tmp_path):
    model = slm.build_model(playground_config(), seed=0)
    final = tmp_path / "latest"
    slm.save_checkpoint(final, model, {"step": 1})
    dead = 2**22 + 12345  # a pid that is not running
    # the instant between "old moved aside" and "new renamed in": both complete copies exist, latest does not
    os.rename(final, tmp_path / f".latest.old-{dead}-1")
    slm.save_checkpoint(tmp_path / "staging", model, {"step": 2})
    os.rename(tmp_path / "staging", tmp_path / f".latest.new-{dead}-2")
    (tmp_path / f".latest.tmp-{dead}-3").mkdir()  # a killed save's partial folder
    assert [info.path.name for info in scan_checkpoints(tmp_path)[0]] == ["latest"]  # listing recovers it
    assert json.loads((final / "metadata.json").read_text())["step"] == 2  # the newer copy won
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # stale staging folders are gone
    # only the old copy left: rolled back to it
    os.rename(final, tmp_path / f".latest.old-{dead}-4")
    assert recover_directory(final) == final and (final / "model.safetensors").is_file()
    # a writer that is still running is left alone
    live = tmp_path / f".latest.tmp-{os.getpid()}-5"
    live.mkdir()
    recover_directory(final)
    assert live.is_dir()


def test_atomic_directory_never_leaves_the_folder_missing(tmp_path, monkeypatch):
    """At every rename of a save, either the old or the new folder is complete under a findable name."""
    model = slm.build_model(playground_config(), seed=0)
    final = tmp_path / "latest"
    slm.save_checkpoint(final, model, {"step": 1})
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        real_replace(src, dst)
        infos = scan_checkpoints(tmp_path)[0] if final.exists() else []
        seen.append((Path(dst).name, bool(infos) or any(
            p.name.startswith((".latest.new-", ".latest.old-")) and (p / "model.safetensors").is_file()
            for p in tmp_path.iterdir())))

    monkeypatch.setattr("slm.checkpoint.os.replace", watching_replace)
    slm.save_checkpoint(final, model, {"step": 2})
    assert len(seen) == 3 and all(ok for _, ok in seen), seen
    assert json.loads((final / "metadata.json").read_text())["step"] == 2


KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    import slm.checkpoint as checkpoint
    from slm.train_config import TrainConfig
    from slm.training import train

    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if os.path.basename(str(src)) == "latest":  # the old latest/ was just moved aside
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.os.replace = replace_then_die
    train(TrainConfig.load(sys.argv[1]))
""")


def test_a_kill_between_the_renames_of_a_save_loses_nothing(tmp_path):
    config = quick_config(tmp_path, stories_file(tmp_path), max_steps=6, eval_every=2, save_every=2)
    run = Path(config.out)
    config_file = tmp_path / "config.json"
    config.save(config_file)
    killed = subprocess.run([PYTHON, "-c", KILL_BETWEEN_RENAMES, str(config_file)], capture_output=True, text=True,
                            env=subprocess_env(), cwd=REPO, timeout=600)
    assert killed.returncode == -9, killed.stderr  # SIGKILL, at the second save of latest/
    assert not (run / "latest").exists()
    assert any(p.name.startswith(".latest.") for p in run.iterdir())
    # restart: the checkpoint is found, and the run resumes from it
    assert [info.path.name for info in scan_checkpoints(run)[0] if info.path.name == "latest"] == ["latest"]
    assert json.loads((run / "latest" / "metadata.json").read_text())["step"] == 4
    result = subprocess.run([PYTHON, TRAIN, "--resume", str(run), "--quiet"], capture_output=True, text=True,
                            env=subprocess_env(), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "finished at step 6/6" in result.stdout
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_best_is_written_after_latest(tmp_path, monkeypatch):
    import slm.training as training

    order = []
    real_save, real_atomic = training.save_checkpoint, training.atomic_directory
    monkeypatch.setattr(training, "save_checkpoint", lambda path, *a, **k: (order.append(Path(path).name),
                                                                            real_save(path, *a, **k))[1])
    monkeypatch.setattr(training, "atomic_directory", lambda path: (order.append(Path(path).name),
                                                                    real_atomic(path))[1])
    # evaluations every 2 steps, but latest/ saved only every 100: an improved best still follows a fresh latest
    training.train(quick_config(tmp_path, stories_file(tmp_path), max_steps=6, eval_every=2, save_every=100))
    assert "best" in order
    for i, name in enumerate(order):
        if name == "best":
            assert i > 0 and order[i - 1] == "latest", order


# ----- training state and the CLI -------------------------------------------------------------------------------
def small_flags(tmp_path: Path) -> list[str]:
    return ["--preset", "tiny", "--data", str(stories_file(tmp_path)), "--context-length", "32", "--batch-size", "2",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--eval-every", "2", "--quiet"]


def run_cli(*args: str, script: str = TRAIN) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, script, *args], capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    out = tmp_path / "run"
    result = run_cli(*small_flags(tmp_path), "--max-steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return tmp_path, out


def test_resume_accepts_the_runs_own_flags_and_refuses_a_change(trained_run):
    tmp_path, out = trained_run
    changed = run_cli(*small_flags(tmp_path), "--batch-size", "3", "--max-steps", "3", "--out", str(out), "--resume")
    assert changed.returncode == 2 and "--batch-size cannot change when resuming" in changed.stderr
    same = run_cli(*small_flags(tmp_path), "--max-steps", "3", "--out", str(out), "--resume")
    assert same.returncode == 0, same.stderr
    assert "finished at step 3/3" in same.stdout


def test_a_corrupt_training_state_is_reported_not_a_key_error(trained_run, tmp_path):
    _, out = trained_run
    state = out / "latest" / "training_state.json"
    saved = state.read_text()
    try:
        data = json.loads(saved)
        del data["param_groups"]
        state.write_text(json.dumps(data))
        result = run_cli("--resume", str(out), "--max-steps", "9")
        assert result.returncode == 2
        assert "damaged ('param_groups' is missing)" in result.stderr and "Traceback" not in result.stderr
        with pytest.raises(CheckpointError, match="damaged"):
            read_training_state(state)
        state.write_text("[1, 2")
        result = run_cli("--resume", str(out), "--max-steps", "9")
        assert result.returncode == 2 and "not valid JSON" in result.stderr and "Traceback" not in result.stderr
    finally:
        state.write_text(saved)


@pytest.mark.parametrize("flags, message", [
    (["--device", "bogus"], "device 'bogus' is not a device"),
    (["--context-length", "100000"], "context_length is 100,000; at most 32,768"),
    (["--batch-size", "100000000"], "batch_size is 100,000,000; at most 65,536"),
    (["--batch-size", "60000", "--context-length", "256"], "tokens per micro-step"),
])
def test_impossible_cli_values_get_one_line_not_a_traceback(tmp_path, flags, message):
    result = run_cli("--data", str(stories_file(tmp_path)), "--out", str(tmp_path / "run"), *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_app_on_a_port_in_use_says_use_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("--checkpoints", str(tmp_path / "c"), "--data-dir", str(tmp_path / "d"), "--port", str(port),
                         script=str(REPO / "app.py"))
    assert result.returncode == 2 and f"--port {port + 1}" in result.stderr
    assert "GRADIO_SERVER_PORT" not in result.stderr and "Traceback" not in result.stderr


def test_app_with_a_bogus_device_says_so(tmp_path):
    result = run_cli("--checkpoints", str(tmp_path / "c"), "--data-dir", str(tmp_path / "d"), "--device", "bogus",
                     "--port", str(free_port()), script=str(REPO / "app.py"))
    assert result.returncode == 2 and "--device 'bogus' is not usable" in result.stderr
    assert "Traceback" not in result.stderr


def test_model_config_bounds_hold_for_every_size():
    values = playground_config().to_dict()
    for field in ("vocab_size", "context_length", "hidden_size", "num_layers", "head_dim", "intermediate_size"):
        with pytest.raises(ValueError, match="at most"):
            ModelConfig.from_dict({**values, field: 10**9, "layer_types": []})
