"""The speed paths (compiled decode step, FlexAttention) must compute exactly what the plain paths do."""

import pytest
import torch

import slm
from slm.masks import flex_attention_available
from slm.model import build_model
from tests.conftest import randomize_norms, small_config


@pytest.fixture(scope="module")
def model():
    model = build_model(small_config(), seed=0)
    randomize_norms(model)
    return model.eval()


def test_static_decode_step_equals_the_full_forward(model):
    """decode_step attends over the whole preallocated buffer with a mask built from a position tensor."""
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch_size=2, max_length=40)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :1], cache=cache)[:, -1]]
        for t in range(1, 30):  # 30 > window 8: the ring buffers wrap
            steps.append(model.decode_step(ids[:, t : t + 1], torch.tensor(t), cache))
            cache.length += 1
    assert (torch.stack(steps, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_compiled_decoding_generates_the_same_tokens(model):
    """torch.compile of the decode step (on CPU the matrix-vector products become reductions)."""
    kwargs = dict(max_new_tokens=40, temperature=0.7, top_k=50, seed=5)
    compiled = slm.generate(model, [3, 1, 4, 1, 5], compiled=True, **kwargs)
    assert compiled == slm.generate(model, [3, 1, 4, 1, 5], compiled=False, **kwargs)
    greedy = slm.generate(model, torch.tensor([[2, 7], [1, 8]]), max_new_tokens=12, temperature=0, compiled=True)
    assert torch.equal(greedy, slm.generate(model, torch.tensor([[2, 7], [1, 8]]), 12, temperature=0))


@pytest.mark.slow
@pytest.mark.skipif(not flex_attention_available(), reason="this torch has no FlexAttention")
def test_flex_attention_equals_sdpa_on_sliding_layers(model):
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
        model.set_attention_backend("flex")
        try:
            flexed = model(ids)
        finally:
            model.set_attention_backend("auto")
    assert (flexed - expected).abs().max().item() <= 1e-4


def test_unknown_attention_backend_is_refused(model):
    with pytest.raises(ValueError, match="attention backend"):
        model.set_attention_backend("xformers")


@pytest.mark.slow
@pytest.mark.skipif(not flex_attention_available(), reason="this torch has no FlexAttention")
def test_flex_attention_inside_a_compiled_model_equals_eager(model):
    """A compiled training step traces FlexAttention and its block mask into its own graph."""
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids)
        model.set_attention_backend("flex")
        try:
            compiled = torch.compile(model, dynamic=False)(ids)
        finally:
            model.set_attention_backend("auto")
    assert (compiled - expected).abs().max().item() <= 1e-4
