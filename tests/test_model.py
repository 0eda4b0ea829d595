import pytest
import torch
import torch.nn.functional as F

from slm.config import GLOBAL, SLIDING
from slm.model import build_model
from tests.conftest import randomize_norms, small_config
from tests.hf_reference import reference_logits, reference_model

PARITY_CONFIGS = {
    "gqa-longer-than-window": dict(),
    "mqa-window-16": dict(num_heads=4, num_kv_heads=1, sliding_window=16, sliding_window_pattern=3, num_layers=6),
    "mha-other-bases": dict(num_heads=2, num_kv_heads=2, head_dim=32, rope_local_base=10_000.0,
                            rope_global_base=1_000_000.0, query_pre_attn_scalar=64.0),
    "untied-explicit-layer-types": dict(tie_embeddings=False, layer_types=[GLOBAL, SLIDING, SLIDING, GLOBAL]),
}


def make_model(seed: int = 0, **overrides):
    model = build_model(small_config(**overrides), seed=seed)
    randomize_norms(model, seed=seed)
    return model.eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_equal_transformers_gemma3(name, attn_implementation):
    model = make_model(**PARITY_CONFIGS[name])
    reference = reference_model(model, attn_implementation)
    ids = torch.randint(0, model.config.vocab_size, (2, 45), generator=torch.Generator().manual_seed(1))
    assert ids.shape[1] > model.config.sliding_window
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (2, 45, model.config.vocab_size)
    assert (ours - reference_logits(reference, ids)).abs().max().item() <= 1e-4


def test_the_sliding_window_changes_the_output():
    """Guards the parity test itself: a model that ignored the window would differ here."""
    model = make_model()
    wide = build_model(small_config(sliding_window=64), seed=0).eval()
    wide.load_state_dict(model.state_dict())
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        same_prefix = (model(ids)[:, :8] - wide(ids)[:, :8]).abs().max()
        later = (model(ids)[:, 20:] - wide(ids)[:, 20:]).abs().max()
    assert same_prefix < 1e-5 < later


@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=1, sliding_window=5), dict(tie_embeddings=False)])
def test_kv_cache_decoding_equals_the_full_forward(overrides):
    model = make_model(**overrides)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_length=40)
        steps = [model(ids[:, :3], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(3, 40)]
        assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4
        # chunks longer than the window, starting after the ring buffer has wrapped
        cache = model.new_cache(batch_size=2, max_length=40)
        chunks = [model(ids[:, a:b], cache=cache) for a, b in [(0, 11), (11, 12), (12, 31), (31, 40)]]
        assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-4


def test_sliding_layers_keep_only_the_window():
    model = make_model()
    cache = model.new_cache(batch_size=1, max_length=64)
    for layer, layer_type in zip(cache.layers, model.config.layer_types, strict=True):
        expected = model.config.sliding_window if layer_type == SLIDING else 64
        assert layer.k.shape[2] == expected


def test_a_full_cache_is_reported():
    model = make_model()
    cache = model.new_cache(batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_last_only_returns_the_last_position():
    model = make_model()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        last = model(ids, cache=model.new_cache(2, 12), last_only=True)
        assert last.shape == (2, 1, 300)
        assert torch.allclose(last[:, 0], model(ids)[:, -1], atol=1e-5)


def test_trace_returns_attention_that_respects_the_window():
    model = make_model()
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(4))
    trace = model.trace(ids)
    with torch.no_grad():
        assert (trace.logits - model(ids)).abs().max().item() <= 1e-5
    assert len(trace.attentions) == model.config.num_layers
    assert len(trace.hidden_states) == model.config.num_layers + 1
    window = model.config.sliding_window
    for layer_type, probs in zip(model.config.layer_types, trace.attentions, strict=True):
        assert probs.shape == (1, model.config.num_heads, 20, 20)
        assert torch.allclose(probs.sum(-1), torch.ones(1, model.config.num_heads, 20))
        assert probs.triu(diagonal=1).abs().max() == 0  # causal
        far = probs[..., 19, : 19 - window + 1]  # keys at distance >= W from the last query
        if layer_type == SLIDING:
            assert far.abs().max() == 0
        else:
            assert far.min() > 0


def test_fused_cross_entropy_equals_the_plain_loss_and_gradients():
    model = make_model()
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(6))
    targets[0, :4] = -100
    loss = model.loss(ids, targets)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    for name, param in model.named_parameters():
        assert torch.allclose(fused_grads[name], param.grad, atol=1e-6, rtol=1e-4), name


def test_initialisation():
    model = build_model(small_config(), seed=0)
    assert all(p.abs().max() == 0 for n, p in model.named_parameters() if n.endswith("norm.weight"))
    weight = model.layers[0].mlp.gate_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.002
    assert model.embed_tokens.weight[model.config.vocab_size :].abs().max() == 0  # vocabulary padding
    assert torch.equal(build_model(small_config(), seed=0).embed_tokens.weight, model.embed_tokens.weight)


def test_bf16_forward_is_close_to_fp32():
    """bf16 keeps ~3 significant digits; over 4 layers logits stay within 0.05 of fp32 and argmax agrees."""
    model = make_model()
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fp32 = model(ids)
        bf16 = model.to(torch.bfloat16)(ids).float()
    assert (bf16 - fp32).abs().max().item() < 0.05
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.95


def test_bf16_embedding_scale_is_cast_first():
    model = build_model(small_config(hidden_size=640, num_heads=4, head_dim=16), seed=0).to(torch.bfloat16)
    ids = torch.tensor([[5]])
    expected = model.embed_tokens.weight[5] * torch.tensor(25.25, dtype=torch.bfloat16)
    assert torch.equal(model.embed(ids)[0, 0], expected)
