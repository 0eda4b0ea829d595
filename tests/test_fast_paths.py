"""The speed paths (compiled decode step, FlexAttention, compiled training) must compute exactly what
the plain paths do, and compile once."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import slm
from slm.attention import flex_attention_available
from slm.model import build_model
from slm.training import LossModule
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
def test_flex_attention_loss_equals_sdpa_on_sliding_layers(model):
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.loss(ids, targets)
        model.set_attention_backend("flex")
        try:
            flexed = model.loss(ids, targets)
        finally:
            model.set_attention_backend("auto")
    assert abs(flexed.item() - expected.item()) <= 1e-5


def test_inference_never_takes_flex_so_new_lengths_compile_nothing(model):
    """Compiled flex recompiled for every new length in inference; inference now always takes SDPA."""
    model.set_attention_backend("flex")
    try:
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch.no_grad():
            for length in (9, 17, 23, 31, 40, 47, 52, 60, 63):
                full = model(torch.randint(0, 300, (1, length)))
                assert torch.isfinite(full).all()
            model.trace(torch.randint(0, 300, (1, 20)))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    finally:
        model.set_attention_backend("auto")


def test_unknown_attention_backend_is_refused(model):
    with pytest.raises(ValueError, match="attention backend"):
        model.set_attention_backend("xformers")


@pytest.mark.slow
@pytest.mark.skipif(not flex_attention_available(), reason="this torch has no FlexAttention")
def test_flex_attention_inside_a_compiled_loss_equals_eager(model):
    """A compiled training step traces FlexAttention and its block mask into its own graph."""
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.loss(ids, targets)
        model.set_attention_backend("flex")
        try:
            compiled = torch.compile(LossModule(model), dynamic=False)(ids, targets)
        finally:
            model.set_attention_backend("auto")
    assert abs(compiled.item() - expected.item()) <= 1e-4


def test_a_compiled_training_step_does_not_recompile_on_its_second_call():
    """RoPE tables filled lazily into a dict once forced a recompile on the second call."""
    model = build_model(small_config(), seed=0).train()
    counter = CompileCounterWithBackend("eager")
    step = torch.compile(LossModule(model), backend=counter, dynamic=False)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        step(ids, ids).backward()
    assert counter.frame_count == 1


def test_rotary_tables_stay_fp32_buffers_outside_the_checkpoint():
    model = build_model(small_config(hidden_size=640), seed=0)
    reference = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    assert reference and not any(name.endswith("inv_freq") for name in model.state_dict())
    model.to(torch.bfloat16)
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            assert buf.dtype == torch.float32 and torch.equal(buf, reference[name])
    assert model.embed_scale.dtype == torch.bfloat16 and model.embed_scale.item() == 25.25
