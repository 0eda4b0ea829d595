import json
import pickle

import pytest
import torch

import slm
from slm.checkpoint import CheckpointError, atomic_directory, save_checkpoint
from slm.loading import list_checkpoints, read_checkpoint_info
from slm.model import build_model
from tests.conftest import randomize_norms, small_config


def saved_model(path, **overrides):
    model = build_model(small_config(**overrides), seed=0)
    randomize_norms(model)
    save_checkpoint(path, model, metadata={"preset": None, "step": 7, "val_loss": 3.25})
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_the_same_logits(tmp_path, tie):
    model = saved_model(tmp_path / "ckpt", tie_embeddings=tie).eval()
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "metadata.json", "model.safetensors"]
    loaded = slm.load_model(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.config == model.config
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_load_with_device_and_dtype(tmp_path):
    saved_model(tmp_path / "ckpt")
    loaded = slm.load_model(tmp_path / "ckpt", device="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"


def test_info_and_listing_read_metadata_without_weights(tmp_path):
    saved_model(tmp_path / "run" / "latest")
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "not-a-checkpoint" / "config.json").write_text("{}")
    infos = list_checkpoints(tmp_path)
    assert [info.name for info in infos] == ["latest"]
    info = read_checkpoint_info(tmp_path / "run" / "latest")
    assert (info.step, info.val_loss, info.format) == (7, 3.25, "slm")
    assert info.parameters == slm.count_parameters(info.config).total
    assert list_checkpoints(tmp_path / "missing") == []


def test_truncated_weights_give_a_clear_error(tmp_path):
    saved_model(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        slm.load_model(tmp_path / "ckpt")


def test_garbage_weights_give_a_clear_error(tmp_path):
    saved_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    with pytest.raises(CheckpointError, match="safetensors"):
        slm.load_model(tmp_path / "ckpt")


def test_missing_config_and_missing_folder(tmp_path):
    saved_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        slm.load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        slm.load_model(tmp_path / "nowhere")


def test_config_that_does_not_fit_the_weights(tmp_path):
    saved_model(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["hidden_size"] = 32
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not belong together"):
        slm.load_model(tmp_path / "ckpt")


class _Exploit:
    """Unpickling this would create a file: the test checks that it never happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_pickles_are_refused_without_being_executed(tmp_path, layout):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    payload = folder / ("pytorch_model.bin")
    payload.write_bytes(pickle.dumps(_Exploit(marker)))
    (folder / "config.json").write_text(small_config().to_json())
    with pytest.raises(CheckpointError, match="pickle"):
        slm.load_model(payload if layout == "file" else folder)
    assert not marker.exists()


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path):
    model = saved_model(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "config.json").write_text("{half")
        raise RuntimeError("disk on fire")
    loaded = slm.load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    saved_model(tmp_path / "ckpt")
    other = build_model(small_config(), seed=1)
    save_checkpoint(tmp_path / "ckpt", other)
    assert torch.equal(slm.load_model(tmp_path / "ckpt").embed_tokens.weight, other.embed_tokens.weight)
    assert not (tmp_path / "ckpt" / "metadata.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
