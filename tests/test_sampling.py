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


def test_generators_can_be_interleaved_and_resumed_on_other_threads(model):
    """A web server resumes a streaming generator on whatever worker thread is free."""
    import threading

    greedy = slm.stream_generate(model, [4, 2], max_new_tokens=10, temperature=0)
    sampled = slm.stream_generate(model, [4, 2], max_new_tokens=10, temperature=1.0, seed=1)
    got: dict[str, list[int]] = {"greedy": [], "sampled": []}

    def advance() -> None:
        got["greedy"].append(next(greedy))
        got["sampled"].append(next(sampled))

    for _ in range(10):
        worker = threading.Thread(target=advance)
        worker.start()
        worker.join()
    assert got["greedy"] == slm.generate(model, [4, 2], max_new_tokens=10, temperature=0)
    assert got["sampled"] == slm.generate(model, [4, 2], max_new_tokens=10, temperature=1.0, seed=1)


# ----- SamplingParams: one value, checked once, passed whole ----------------------------------------
from slm.sampling import SamplingParams  # noqa: E402


def test_sampling_params_equal_the_keyword_form(model):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=5, stop_ids=(7,))
    assert slm.generate(model, [1, 2, 3], 15, params) == slm.generate(
        model, [1, 2, 3], 15, temperature=0.9, top_k=40, top_p=0.9, seed=5, stop_token_ids=[7]
    )
    assert list(slm.stream_generate(model, [1, 2, 3], 15, params)) == slm.generate(model, [1, 2, 3], 15, params)
    with pytest.raises(ValueError, match="not both"):
        slm.generate(model, [1, 2], 3, params, temperature=0.5)


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 5e-324, 1e-6])
def test_tiny_positive_temperatures_are_greedy_not_nan(model, temperature):
    assert SamplingParams(temperature=temperature).greedy
    assert slm.generate(model, [5, 17], 6, temperature=temperature, seed=1) == slm.generate(
        model, [5, 17], 6, temperature=0
    )
    probs = next_token_probabilities(torch.tensor([[2.0, 1.0, 0.0]]), temperature)
    assert probs.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("seed", [2**63, 2**64 + 5, 10**30, -1])
def test_huge_seeds_are_reduced_modulo_2_to_the_63(model, seed):
    """Once "Overflow when unpacking long long"; now any integer works, reduced modulo 2**63."""
    params = SamplingParams(temperature=1.0, seed=seed)
    assert params.seed == seed % 2**63
    assert slm.generate(model, [4], 5, temperature=1.0, seed=seed) == slm.generate(
        model, [4], 5, temperature=1.0, seed=seed % 2**63
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=math.inf), "temperature must be finite"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(seed=1.5), "seed must be a whole number"),
        (dict(seed=math.nan), "seed must be a whole number"),
        (dict(top_k=math.inf), "top_k"),
    ],
)
def test_sampling_params_refuse_meaningless_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_nan_model_output_gets_a_clear_message():
    broken = build_model(small_config(), seed=0).eval()
    with torch.no_grad():
        broken.layers[1].mlp.up_proj.weight.fill_(math.nan)
    for run in (slm.generate, lambda *a, **k: list(slm.stream_generate(*a, **k))):
        with pytest.raises(ValueError, match="output is NaN"):
            run(broken, [1, 2, 3], 4, temperature=0.8, seed=0)
    with pytest.raises(ValueError, match="output is NaN"):
        slm.generate(broken, torch.tensor([[1, 2], [3, 4]]), 4, temperature=0)


def test_the_exponential_race_draws_in_proportion_to_the_probabilities():
    """argmax(p / q), q ~ Exp(1), picks token i with probability p_i: no multinomial, no host sync."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(20000, 1)
    tokens = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
