"""The playground serving a Gemma 3 folder that brings its own tokenizer: a real Gradio server, called
through gradio_client; every text is decoded by the checkpoint's tokenizer, not GPT-2's."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from app_helpers import running_app, write_stories
from gemma_helpers import END_OF_TURN_ID, make_gemma_folder
from gradio_client import Client
from gradio_client.exceptions import AppError

import slm
from slm.checkpoint import read_metadata
from slm.hub import gated_message
from ui.train_tab import FILE_SOURCE

pytest.importorskip("transformers")

KEY = "hub/someone--tiny-gemma-3-it"
PROMPT = "Once upon a time, Lily saw a 🐶"


@pytest.fixture(scope="module")
def gemma_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma-app")
    folder = make_gemma_folder(root / "checkpoints" / KEY)
    write_stories(root / "data" / "stories.txt", count=100)
    with running_app(root / "checkpoints", root / "data") as (url, _manager):
        yield {"url": url, "folder": folder, "checkpoints": root / "checkpoints"}


@pytest.fixture(scope="module")
def client(gemma_app):
    client = Client(gemma_app["url"], verbose=False)
    description = client.predict(KEY, api_name="/select_model")
    assert "563-token vocabulary (its own tokenizer.json)" in description
    return client


@pytest.fixture(scope="module")
def lm(gemma_app):
    return slm.load(gemma_app["folder"])


def test_generate_decodes_with_the_checkpoint_tokenizer(client, lm):
    tok = lm.tokenizer
    text, stats = client.predict(PROMPT, 15, 0.0, 0, 1.0, 0, False, api_name="/generate")
    expected = slm.generate(lm.model, tok.encode(PROMPT), 15, temperature=0, stop_token_ids=tok.stop_ids)
    expected = [t for t in expected if t not in tok.stop_ids]
    assert text == PROMPT + tok.decode(expected)
    assert text != PROMPT + slm.load_tokenizer().decode(expected)  # GPT-2 would read these ids as other text
    assert "done" in stats


def test_the_chat_template_wraps_the_prompt(client, lm):
    tok = lm.tokenizer
    text, _ = client.predict("Tell me a story", 8, 0.0, 0, 1.0, 0, True, api_name="/generate")
    ids = tok.encode_chat("Tell me a story")
    assert ids[:2] == [2, 105]  # <bos><start_of_turn>user ...
    expected = [t for t in slm.generate(lm.model, ids, 8, temperature=0, stop_token_ids=tok.stop_ids)
                if t not in tok.stop_ids]
    assert text == "Tell me a story" + tok.decode(expected)


def test_generation_stops_at_the_end_of_turn_token(lm):
    """A copy of the model whose next token after the prompt is <end_of_turn> (its embedding row made
    to point along the last hidden state): generation stops there, as at EOS."""
    from slm.sampling import SamplingParams
    from ui.generate_tab import SamplingSettings, stream_text

    model = slm.load_model(lm.path)
    ids = lm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        final = model.norm(model.trace(torch.tensor([ids])).hidden_states[-1])
        model.embed_tokens.weight[END_OF_TURN_ID] = 50 * final[0, -1] / final[0, -1].norm()
        assert int(model(torch.tensor([ids]))[0, -1].argmax()) == END_OF_TURN_ID
    steps = list(stream_text(model, lm.tokenizer, ids, SamplingSettings(10, SamplingParams(temperature=0.0))))
    assert steps[-1] == ("", 1)  # one token drawn, the end of turn, and no text


def test_a_prompt_cut_to_fit_keeps_its_bos(lm):
    from ui.generate_tab import prepare_prompt

    text = "Lily had a red kite and a cat named Max. " * 40
    full = lm.tokenizer.encode(text)
    ids, new_tokens, dropped = prepare_prompt(lm.tokenizer, lm.model, text, 100)
    context = lm.model.config.context_length
    assert dropped > 0 and len(ids) + new_tokens <= context and len(ids) + dropped == len(full)
    assert ids[0] == lm.tokenizer.bos_id and ids[1:] == full[-(len(ids) - 1):]


def test_step_by_step_shows_the_checkpoint_tokens(client, lm):
    tok = lm.tokenizer
    ids = tok.encode(PROMPT)
    story, _, _, _ = client.predict(PROMPT, 1.0, 0, 1.0, api_name="/step_start")
    assert [s["token"] for s in story] == tok.token_strings(ids)
    assert story[0]["token"] == "<bos>" and any(s["token"] == "\\xf0" for s in story)  # byte fallback shown
    story, _, _, _ = client.predict(PROMPT, 0.0, 0, 1.0, 0, api_name="/step_sample")
    with torch.no_grad():
        greedy = int(lm.model(torch.tensor([ids]))[0, -1].argmax())
    # the text is coloured by the probability each token was drawn with: a greedy draw had all of it
    assert story[-1] == {"token": tok.token_strings([greedy])[0], "class_or_confidence": 1.0}


def test_inspect_uses_the_checkpoint_tokenizer(client, lm):
    tok = lm.tokenizer
    text = "Once upon a time, there was a little girl named Lily. She had a red kite."
    highlighted, details = client.predict(text, 5, api_name="/inspect")
    ids = tok.encode(text)
    assert details["token_ids"] == ids and [h["token"] for h in highlighted] == tok.token_strings(ids)
    with torch.no_grad():
        probs = torch.softmax(lm.model(torch.tensor([ids]))[0].float(), -1)
    expected = [float(probs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert details["probabilities"][1:] == pytest.approx(expected, rel=1e-4)
    top = torch.topk(probs[-1], 5).indices.tolist()
    assert [c["token"] for c in details["next_token"]["candidates"]] == tok.token_strings(top)
    bars, lens, info = client.predict(3, api_name="/inspect_position")
    assert bars["type"] == "matplotlib"
    assert lens["type"] == "matplotlib" and "entropy" in info


def _gated_error():
    from huggingface_hub.errors import GatedRepoError

    http = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    url = "https://huggingface.co/google/gemma-3-270m/resolve/main/config.json"
    response = http.Response(403, request=http.Request("GET", url))
    return GatedRepoError(f"403 Client Error. Cannot access gated repo for url {url}.", response=response)


def test_a_gated_repo_says_how_to_get_access(client, monkeypatch):
    def refuse(repo_id, **kwargs):
        raise _gated_error()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(AppError) as error:
        client.predict("google/gemma-3-270m", api_name="/load_hub")
    message = str(error.value)
    assert "accept its licence" in message and "HF_TOKEN" in message and "unsloth/gemma-3-270m" in message
    assert message.count("google/gemma-3-270m") >= 1 and "Traceback" not in message
    assert "unsloth" not in gated_message("someone/private-model")  # a copy is named only where one is known


def test_the_readme_lines_load_a_hub_repo_with_its_tokenizer(gemma_app, tmp_path, monkeypatch):
    """`slm.load("google/gemma-3-270m")` on a small stand-in: the download is replaced (the Hub is
    unreachable here), the folder it fills is real, with tokenizer files."""
    calls = []

    def fake_snapshot_download(repo_id, local_dir=None, allow_patterns=None, **kwargs):
        calls.append(allow_patterns)
        target = Path(local_dir) if local_dir else tmp_path / "hf-cache" / repo_id.replace("/", "--")
        shutil.copytree(gemma_app["folder"], target, dirs_exist_ok=True)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    lm = slm.load("google/gemma-3-270m")
    tok = lm.tokenizer
    new = slm.generate(lm.model, tok.encode("Once upon a time"), max_new_tokens=5, temperature=0,
                       stop_token_ids=tok.stop_ids)
    assert tok.decode(new) == slm.load(gemma_app["folder"]).tokenizer.decode(new)
    assert {"*.json", "*.safetensors"} <= set(calls[0]) and not any(p.endswith((".bin", ".pt")) for p in calls[0])


def test_the_train_tab_continues_an_imported_model(gemma_app, client, lm):
    # preset, data source, stories, data file, steps, batch size, learning rate, context length, continue from
    message = client.predict("tiny", FILE_SOURCE, 0, "stories.txt", 3, 2, 1e-3, 32, 0, KEY, api_name="/start_training")
    assert message.startswith("Started run")
    deadline = time.monotonic() + 240
    while (status := client.predict(api_name="/training_status"))["state"] in ("preparing", "running", "stopping"):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["state"] == "finished", status["message"]
    latest = Path(status["run_dir"]) / "latest"
    assert Path(status["run_dir"]).name.startswith("someone--tiny-gemma-3-it-")
    assert read_metadata(latest)["init_from"] == str(gemma_app["folder"].resolve())
    trained = slm.load(latest)
    assert trained.tokenizer.identity == lm.tokenizer.identity and trained.model.config == lm.model.config
    with pytest.raises(AppError, match="outside the folders"):
        client.predict("tiny", FILE_SOURCE, 0, "stories.txt", 3, 2, 1e-3, 32, 0, "../../etc",
                       api_name="/start_training")
