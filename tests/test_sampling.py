import math

import pytest
import torch

import slm
from slm.model import build_model
from slm.sampling import next_token_probabilities, process_logits, sample_next
from tests.conftest import randomize_norms, small_config


@pytest.fixture(scope="module")
def model():
    model = build_model(small_config(), seed=0)
    randomize_norms(model)
    return model.eval()


def greedy_without_cache(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def test_greedy_generation_equals_repeated_full_forward_passes(model):
    prompt = [5, 17, 42, 7]
    new = slm.generate(model, prompt, max_new_tokens=30, temperature=0.0)
    assert new == greedy_without_cache(model, prompt, 30)  # 34 positions: past the window of 8


def test_streaming_yields_what_generate_returns(model):
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=40, seed=123)
    streamed = list(slm.stream_generate(model, [1, 2, 3], **kwargs))
    assert all(isinstance(t, int) for t in streamed)
    assert streamed == slm.generate(model, [1, 2, 3], **kwargs)


def test_a_seed_makes_sampling_reproducible(model):
    runs = [slm.generate(model, [9, 8], max_new_tokens=20, temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_batched_prompts(model):
    ids = torch.tensor([[5, 17, 42, 7], [1, 2, 3, 4]])
    new = slm.generate(model, ids, max_new_tokens=6, temperature=0)
    assert new.shape == (2, 6)
    assert new[1].tolist() == greedy_without_cache(model, [1, 2, 3, 4], 6)


def test_stop_tokens_end_generation(model):
    first = slm.generate(model, [5, 17], max_new_tokens=10, temperature=0)
    stop = first[3]
    stopped = slm.generate(model, [5, 17], max_new_tokens=10, temperature=0, stop_token_ids=[stop])
    assert stopped == first[: first.index(stop) + 1]


def test_top_k_keeps_only_k_tokens():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    probs = next_token_probabilities(logits, temperature=1.0, top_k=2)
    assert (probs > 0).sum() == 2 and probs[0, 1] > probs[0, 3] > 0
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1, 3}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = next_token_probabilities(probs.log(), top_p=0.75) > 0
    assert kept.tolist() == [[True, True, False, False]]
    kept = next_token_probabilities(probs.log(), top_p=0.8) > 0  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept.tolist() == [[True, True, False, False]]
    assert (next_token_probabilities(probs.log(), top_p=0.01) > 0).sum() == 1


def test_temperature_sharpens_and_zero_is_greedy():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold, hot = next_token_probabilities(logits, 0.5), next_token_probabilities(logits, 2.0)
    assert cold[0, 0] > next_token_probabilities(logits, 1.0)[0, 0] > hot[0, 0]
    assert next_token_probabilities(logits, 0.0).tolist() == [[1.0, 0.0, 0.0]]
    assert torch.isinf(process_logits(logits, -1.0)[0, 1:]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=math.nan), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
    ],
)
def test_meaningless_sampling_values_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        slm.generate(model, [1, 2], max_new_tokens=3, **kwargs)


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        slm.generate(model, [], max_new_tokens=3)
