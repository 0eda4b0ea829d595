import json
import subprocess
import sys

import pytest
import torch

import slm
from slm.checkpoint import CheckpointError, save_checkpoint
from slm.config import preset
from slm.hf import config_from_hf, from_hf, to_hf
from slm.model import build_model
from tests.conftest import REPO_ROOT, randomize_norms, small_config

transformers = pytest.importorskip("transformers")


def trained_looking_model(**overrides):
    model = build_model(small_config(**overrides), seed=3)
    randomize_norms(model, seed=3)
    return model.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_loads_in_transformers_with_the_same_logits(tmp_path, tie):
    model = trained_looking_model(tie_embeddings=tie)
    save_checkpoint(tmp_path / "ours", model)
    to_hf(tmp_path / "ours", tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert type(reference).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        assert (reference(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_from_hf_reads_a_folder_transformers_wrote(tmp_path):
    model = trained_looking_model(num_kv_heads=1, sliding_window=5)
    save_checkpoint(tmp_path / "ours", model)
    to_hf(tmp_path / "ours", tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    reference.save_pretrained(tmp_path / "saved-by-transformers")  # their writer, not ours
    from_hf(tmp_path / "saved-by-transformers", tmp_path / "back")
    back = slm.load_model(tmp_path / "back")
    direct = slm.load_model(tmp_path / "saved-by-transformers")  # load_model reads their folders too
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        expected = model(ids)
        assert (back(ids) - expected).abs().max().item() <= 1e-5
        assert (direct(ids) - expected).abs().max().item() <= 1e-5
    assert back.config == model.config


def test_command_line_round_trip(tmp_path):
    model = trained_looking_model()
    save_checkpoint(tmp_path / "ours", model)
    run = [sys.executable, "-m", "slm.hf"]
    out = subprocess.run([*run, "to-hf", tmp_path / "ours", tmp_path / "hf"], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    assert "wrote" in out.stdout
    subprocess.run([*run, "from-hf", tmp_path / "hf", tmp_path / "back"], cwd=REPO_ROOT, check=True)
    assert torch.equal(slm.load_model(tmp_path / "back").embed_tokens.weight, model.embed_tokens.weight)
    failed = subprocess.run([*run, "to-hf", tmp_path / "missing", tmp_path / "x"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert failed.returncode == 1 and "does not exist" in failed.stderr


def test_the_gpt2_tokenizer_travels_with_the_model(tmp_path, tokenizer):
    model = build_model(preset("tiny", num_layers=1), seed=0)
    save_checkpoint(tmp_path / "ours", model)
    to_hf(tmp_path / "ours", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time, Lily saw a 🐶 and said “héllo”!\n\nThe end.<|endoftext|>"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id


def test_hf_config_matches_gemma3_270m():
    hf = json.loads(json.dumps(transformers.Gemma3TextConfig(
        vocab_size=50257, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=1024,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
    ).to_dict()))
    assert config_from_hf(hf) == preset("gemma3-270m")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"final_logit_softcapping": 30.0}, "not supported"),
        ({"model_type": "llama"}, "not a Gemma 3 text model"),
        ({"text_config": {}}, "multimodal"),
    ],
)
def test_unsupported_hf_configs_are_refused(tmp_path, change, message):
    model = trained_looking_model()
    save_checkpoint(tmp_path / "ours", model)
    to_hf(tmp_path / "ours", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        slm.load_model(tmp_path / "hf")
