"""Gemma 3 text checkpoints with their own tokenizer: small folders written by transformers, with a
tokenizer.json the test trains, loaded through our model and our tokenizer interface."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gemma_helpers import (
    BOS_ID,
    END_OF_TURN_ID,
    EOS_ID,
    PAD_ID,
    make_gemma_folder,
    write_gemma_tokenizer,
)

import slm
from slm.checkpoint import CheckpointError, read_metadata, save_checkpoint
from slm.hf import from_hf, to_hf
from slm.tokenizer import FileTokenizer, GPT2Tokenizer, load_tokenizer
from tests.conftest import REPO_ROOT, small_config

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "héllo wörld — 可爱的贝壳 🐶🐱 «quoted»\n\nnew  paragraph  with  double  spaces",
    "<start_of_turn>user\nTell me a story<end_of_turn>",
    " leading space and trailing ",
    "",
]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return make_gemma_folder(tmp_path_factory.mktemp("gemma") / "tiny-gemma-3")


@pytest.fixture(scope="module")
def reference(gemma_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(gemma_dir, attn_implementation="eager").eval()


def test_ids_equal_autotokenizer(gemma_dir):
    ours = slm.load_tokenizer(gemma_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(gemma_dir)
    assert isinstance(ours, FileTokenizer)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == BOS_ID  # the post-processor's BOS, as transformers adds it
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False).removeprefix("<bos>")
    assert (ours.eot_id, ours.bos_id, ours.pad_id) == (EOS_ID, BOS_ID, PAD_ID)
    assert ours.stop_ids == [EOS_ID, END_OF_TURN_ID]
    assert ours.vocab_size == len(theirs)


def test_decode_leaves_bos_eos_and_padding_out(gemma_dir):
    tok = slm.load_tokenizer(gemma_dir)
    ids = tok.encode("Lily had a kite.")
    assert tok.decode([PAD_ID, *ids, EOS_ID, PAD_ID]) == "Lily had a kite."
    assert tok.decode(tok.encode("a<end_of_turn>")) == "a<end_of_turn>"  # other special tokens are shown


def test_byte_fallback_pieces_display_and_stream(gemma_dir):
    tok = slm.load_tokenizer(gemma_dir)
    text = "Lily saw a 🐶 and said “héllo”"
    ids = tok.encode(text)
    pieces = tok.token_strings(ids)
    assert pieces[0] == "<bos>"
    dog = [p for p in pieces if p.startswith("\\x")]
    assert dog and dog[0] == "\\xf0", pieces  # the emoji's first byte, shown as an escape (<0xF0>)
    decoder = tok.stream_decoder()
    streamed = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(streamed) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in streamed)
    assert "🐶" in streamed  # held back until the last of its four byte tokens


def test_token_byte_lengths(gemma_dir):
    tok = slm.load_tokenizer(gemma_dir)
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[[PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID]].tolist() == [0, 0, 0, 0]
    assert lengths[tok.backend.token_to_id("<0xE2>")] == 1
    for text in TEXTS[:2]:
        ids = tok.encode(text)
        assert int(lengths[ids].sum()) == len(text.encode())  # bits per byte divides by exactly this
    gpt2 = slm.load_tokenizer()
    assert int(gpt2.token_byte_lengths()[gpt2.encode(TEXTS[1])].sum()) == len(TEXTS[1].encode())


def test_chat_template_equals_transformers(gemma_dir):
    tok = slm.load_tokenizer(gemma_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(gemma_dir)
    messages = [{"role": "user", "content": "Tell me a story about Lily"}]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert tok.encode_chat("Tell me a story about Lily") == list(expected)
    assert tok.render_chat(messages).startswith("<bos><start_of_turn>user\n")


def test_logits_and_greedy_continuation_equal_transformers(gemma_dir, reference):
    lm = slm.load(gemma_dir)
    assert lm.model.config.vocab_size == lm.tokenizer.vocab_size
    ids = lm.tokenizer.encode("Once upon a time, there was a little girl named Lily. She had a red kite.")
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (lm.model(x) - reference(x).logits).abs().max().item() <= 1e-4
    ours = slm.generate(lm.model, ids, 20, temperature=0)
    theirs = reference.generate(x, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    assert ours == theirs[0, len(ids):].tolist()


def test_a_gemma_folder_without_its_tokenizer_is_refused(gemma_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(gemma_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    assert isinstance(load_tokenizer(bare), GPT2Tokenizer)  # no files: the bundled GPT-2
    with pytest.raises(CheckpointError, match=r"563-token vocabulary but no tokenizer files \(tokenizer.json"):
        slm.load(bare)
    # a tokenizer from another model, with ids beyond the model's vocabulary
    small = make_gemma_folder(tmp_path / "small", with_tokenizer=False, vocab_size=200)
    write_gemma_tokenizer(small)
    with pytest.raises(CheckpointError, match="produces ids up to 562"):
        slm.load(small)


def test_our_checkpoints_keep_their_tokenizer_and_conversion_carries_it(gemma_dir, tmp_path, reference):
    from_hf(gemma_dir, tmp_path / "ours")
    ours = tmp_path / "ours"
    assert (ours / "tokenizer.json").read_bytes() == (gemma_dir / "tokenizer.json").read_bytes()
    recorded = read_metadata(ours)["tokenizer"]
    assert recorded["name"] == "tokenizer.json" and recorded["vocab_size"] == 563
    lm = slm.load(ours)
    assert lm.tokenizer.identity == load_tokenizer(gemma_dir).identity
    to_hf(ours, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS_ID, EOS_ID)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    ids = back_tok(TEXTS[0], return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == lm.tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        assert (back(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    # a checkpoint that recorded its own tokenizer but lost the file says so
    (ours / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="trained with its own tokenizer"):
        slm.load(ours)


def test_save_checkpoint_with_the_gpt2_tokenizer_records_it_and_copies_nothing(tmp_path):
    model = slm.build_model(small_config(vocab_size=50257), seed=0)
    save_checkpoint(tmp_path / "c", model, {"step": 1}, tokenizer=slm.load_tokenizer())
    assert read_metadata(tmp_path / "c")["tokenizer"]["name"] == "gpt2"
    assert not (tmp_path / "c" / "tokenizer.json").exists()
    assert isinstance(slm.load(tmp_path / "c").tokenizer, GPT2Tokenizer)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux /proc")
def test_a_262k_vocabulary_model_inspects_300_tokens_in_bounded_memory(tmp_path):
    """Gemma's 262,144-token vocabulary with a tiny width: the (tokens x vocabulary) logits alone would
    be 315 MB in fp32 for 300 tokens, and log-softmax, exp and entropy each as much again; inspecting
    (next-token statistics and the logit lens) goes through the head in chunks instead."""
    folder = make_gemma_folder(tmp_path / "big-vocab", tokenizer_vocab=262_144, vocab_size=262_144, hidden_size=16,
                               intermediate_size=32, head_dim=8, max_position_embeddings=512)
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "inspect_memory.py"), str(folder), "300"],
                         capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 300 and result["vocab"] == 262_144
    grown = result["peak_mb"] - result["before_mb"]
    assert grown < 250, f"inspecting 300 tokens took {grown:.0f} MB above the loaded model"


def test_train_init_from_keeps_the_imported_tokenizer_and_vocabulary(tmp_path):
    """`train.py --init-from FOLDER`: a few steps on stories, with the imported model's tokenizer (its
    70,000-token vocabulary needs uint32 token files) and its weights as the starting point."""
    from training_helpers import PYTHON, stories_file, subprocess_env

    from slm.data import DataSpec, cache_key, iter_file_stories

    folder = make_gemma_folder(tmp_path / "imported", tokenizer_vocab=70_000, vocab_size=70_000)
    imported = slm.load(folder)
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = subprocess.run(
        [PYTHON, str(REPO_ROOT / "train.py"), "--init-from", str(folder), "--data", str(stories_file(tmp_path)),
         "--context-length", "32", "--batch-size", "2", "--max-steps", "4", "--eval-every", "2", "--lr", "1e-3",
         "--cache-dir", str(cache), "--device", "cpu", "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "finished at step 4/4" in result.stdout
    trained = slm.load(out / "latest")
    assert trained.tokenizer.identity == imported.tokenizer.identity
    assert (out / "latest" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert trained.model.config == imported.model.config  # vocabulary and architecture kept
    metadata = read_metadata(out / "latest")
    assert metadata["init_from"] == str(folder) and metadata["tokenizer"]["vocab_size"] == 70_000
    # started from the imported weights (a fresh init would be nowhere near them), and moved
    before, after = imported.model.embed_tokens.weight, trained.model.embed_tokens.weight
    change = ((after - before).norm() / before.norm()).item()
    assert 0 < change < 0.1
    # its rows for ids the stories lack differ, so the loss runs over all 70,000 ids
    from slm.training import read_metrics

    start = next(r for r in read_metrics(out) if r["kind"] == "start")
    assert start["trained_columns"] == start["vocabulary"] == 70_000
    # the data was tokenized by the imported tokenizer, into uint32 files, under its own cache key
    meta = json.loads(next(cache.glob("*/meta.json")).read_text())
    assert meta["dtype"] == "uint32" and meta["eot_id"] == EOS_ID
    tokens = np.memmap(next(cache.glob("*/train.bin")), dtype=np.uint32, mode="r")
    story = list(iter_file_stories(stories_file(tmp_path)))[1]  # the first goes to validation
    expected = [*imported.tokenizer.encode(story), EOS_ID]  # BOS first, as the model was trained
    assert tokens[: len(expected)].tolist() == expected and expected[0] == BOS_ID
    spec = DataSpec(str(stories_file(tmp_path)))
    assert cache_key(spec, imported.tokenizer) != cache_key(spec, slm.load_tokenizer())
