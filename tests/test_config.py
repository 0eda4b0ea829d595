import json

import pytest

from slm.config import GLOBAL, SLIDING, ModelConfig, count_parameters, preset
from slm.model import build_model
from tests.conftest import small_config


def test_gemma3_270m_matches_the_published_layout():
    config = preset("gemma3-270m")
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (640, 18, 4, 1)
    assert (config.head_dim, config.intermediate_size, config.sliding_window) == (256, 2048, 512)
    globals_ = [i + 1 for i, t in enumerate(config.layer_types) if t == GLOBAL]
    assert globals_ == [6, 12, 18]
    assert count_parameters(config).total == 132_490_496
    assert count_parameters(preset("gemma3-270m", vocab_size=262_144)).total == 268_098_176


@pytest.mark.parametrize("name", ["tiny", "small", "gemma3-270m"])
def test_counted_parameters_equal_the_built_model(name):
    config = preset(name)
    model = build_model(config, device="meta")
    counted = count_parameters(config)
    exported = model.export_state_dict()
    assert sum(t.numel() for t in exported.values()) == counted.total
    assert counted.embedding + counted.non_embedding == counted.total
    assert counted.embedding == exported["embed_tokens.weight"].numel()


def test_untied_embeddings_count_the_head():
    config = small_config(tie_embeddings=False)
    counted = count_parameters(config)
    assert counted.embedding == 2 * config.vocab_size * config.hidden_size
    model = build_model(config)
    assert sum(t.numel() for t in model.export_state_dict().values()) == counted.total


def test_json_round_trip_keeps_every_field(tmp_path):
    config = small_config(layer_types=[SLIDING, GLOBAL, GLOBAL, SLIDING], tie_embeddings=False, init_std=0.01)
    path = tmp_path / "config.json"
    config.save(path)
    loaded = ModelConfig.load(path)
    assert loaded == config
    assert json.loads(path.read_text())["layer_types"] == [SLIDING, GLOBAL, GLOBAL, SLIDING]


def test_layer_types_follow_the_pattern_unless_given():
    assert small_config(num_layers=6, sliding_window_pattern=3).layer_types == [SLIDING, SLIDING, GLOBAL] * 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=3, num_kv_heads=2), "multiple of num_kv_heads"),
        (dict(head_dim=15), "even"),
        (dict(layer_types=[SLIDING]), "layer_types has 1"),
        (dict(layer_types=["local"] * 4), "unknown layer types"),
        (dict(hidden_size=0), "positive integer"),
    ],
)
def test_invalid_configs_are_refused_with_a_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_unknown_fields_and_presets_are_named():
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
