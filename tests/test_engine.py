"""The inference engine under the load an app puts on it: many models, cache sizes and threads.

The compiled decode step is inductor on CPU here (the GPU adds CUDA graphs on a decode thread, which
`Engine(decode_thread=True)` exercises on CPU too). Every call must answer, and answer what eager does.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import slm
from slm import engine as engine_module
from slm.engine import Engine, bucket_length
from slm.model import build_model
from tests.conftest import randomize_norms, small_config

NEW_TOKENS = 8
PROMPT_LENGTHS = (3, 70, 130)  # with 8 new tokens: cache buckets 64, 128 and 256


def make_models(count: int = 3):
    models = []
    for seed in range(count):
        model = build_model(small_config(num_layers=2), seed=seed).eval()
        randomize_norms(model, seed=seed)
        models.append(model)
    return models


@pytest.fixture(scope="module")
def models():
    return make_models()


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(1, 300, (length,), generator=torch.Generator().manual_seed(seed + length)).tolist()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_buckets_are_powers_of_two():
    assert [bucket_length(n) for n in (1, 64, 65, 200, 257)] == [64, 64, 128, 256, 512]
    assert {bucket_length(n + NEW_TOKENS) for n in PROMPT_LENGTHS} == {64, 128, 256}


@pytest.mark.slow
def test_compiled_decoding_under_app_like_load(models, caplog):
    """3 models x 3 cache sizes (9 compiled steps: one more than dynamo's default recompile limit, where
    the old fullgraph step raised), called from 4 threads at once, then again: every call answers,
    equals eager greedy decoding, and nothing compiles twice."""
    combos = [(m, n) for m in range(len(models)) for n in PROMPT_LENGTHS]
    expected = {
        (m, n): slm.generate(models[m], prompt(n, m), NEW_TOKENS, temperature=0, compiled=False) for m, n in combos
    }
    engine = Engine()
    graphs_before = compiled_graphs()
    results: dict[tuple[int, int, int], list[int]] = {}
    errors: list[BaseException] = []

    def worker(index: int, rounds: int) -> None:
        try:
            for round_ in range(rounds):
                for m, n in combos[index::4]:
                    results[(m, n, round_)] = slm.generate(
                        models[m], prompt(n, m), NEW_TOKENS, temperature=0, compiled=True, engine=engine
                    )
        except BaseException as exc:
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="slm.engine"):
        threads = [threading.Thread(target=worker, args=(i, 2)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    assert not errors, errors
    assert len(results) == 2 * len(combos)
    for (m, n, _), tokens in results.items():
        assert tokens == expected[(m, n)], (m, n)
    assert engine.compiled_count == len(combos) > 8
    assert compiled_graphs() - graphs_before == engine.compiled_count  # the second round compiled nothing
    assert not [r for r in caplog.records if r.name == "slm.engine"]


@pytest.mark.slow
def test_a_compile_failure_falls_back_to_eager_with_one_warning(models, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor is not available here")

        return run

    monkeypatch.setattr(engine_module.torch, "compile", broken_compile)
    engine = Engine()
    model = models[0]
    with caplog.at_level(logging.WARNING, logger="slm.engine"):
        outputs = [
            slm.generate(model, prompt(n), NEW_TOKENS, temperature=0, compiled=True, engine=engine)
            for n in (3, 3, 70)
        ]
    expected = [slm.generate(model, prompt(n), NEW_TOKENS, temperature=0, compiled=False) for n in (3, 3, 70)]
    assert outputs == expected
    warnings = [r for r in caplog.records if r.name == "slm.engine"]
    assert len(warnings) == 1 and "decodes eagerly" in warnings[0].getMessage()


@pytest.mark.slow
def test_warm_up_compiles_every_bucket_so_requests_compile_nothing(models, monkeypatch):
    """What the app does at model load; with the GPU's decode thread, here on CPU."""
    monkeypatch.setenv(engine_module.ENV_SWITCH, "1")  # the default path, switched on for a small model
    engine = Engine(decode_thread=True)
    model = models[1]
    assert engine.warm_up(model, max_length=128) == [64, 128]
    count = engine.compiled_count
    sampled = dict(temperature=0.9, top_k=20, seed=11)
    for n in (3, 70):
        assert slm.generate(model, prompt(n), NEW_TOKENS, engine=engine, **sampled) == slm.generate(
            model, prompt(n), NEW_TOKENS, compiled=False, **sampled
        )
    assert engine.compiled_count == count


def test_the_default_is_eager_for_small_models_on_cpu_and_the_switch_forces_it(models, monkeypatch):
    engine = Engine()
    monkeypatch.delenv(engine_module.ENV_SWITCH, raising=False)
    assert not engine.wants_compiled(models[0])  # 40k parameters: a compile would cost more than it saves
    assert engine.warm_up(models[0]) == []
    monkeypatch.setattr(engine_module, "COMPILE_MIN_PARAMETERS", 1000)
    assert engine.wants_compiled(models[0])
    monkeypatch.setenv(engine_module.ENV_SWITCH, "0")
    assert not engine.wants_compiled(models[0])


def test_caches_are_reused_across_requests(models):
    engine = Engine()
    model = models[0]
    with engine.lease(model, 1, 20, compiled=False) as slot:
        first = slot.cache
    with engine.lease(model, 1, 40, compiled=False) as slot:
        assert slot.cache is first  # same bucket: the same static cache
        with engine.lease(model, 1, 40, compiled=False) as other:
            assert other.cache is not first  # held by a request: another one
    # a reused cache does not leak the previous request's keys into the next one
    long_then_short = [slm.generate(model, prompt(n), 5, temperature=0, compiled=False, engine=engine)
                       for n in (50, 4)]
    assert long_then_short[1] == slm.generate(model, prompt(4), 5, temperature=0, compiled=False, engine=Engine())


def test_the_engine_does_not_keep_a_dropped_model_alive():
    """An app evicts models it no longer shows; their caches and compiled steps must go with them."""
    import gc
    import weakref

    engine = Engine(backend="eager")  # compiled (traced, guarded) without generating code: quick
    model = make_models(1)[0]
    eager = slm.generate(model, prompt(5), 4, temperature=0, compiled=False)
    assert slm.generate(model, prompt(5), 4, temperature=0, compiled=True, engine=engine) == eager
    assert engine.compiled_count == 1
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
