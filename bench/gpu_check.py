"""GPU acceptance check: one script, under five minutes on one GPU, pass/fail with numbers.

    python -m bench.gpu_check            # on a machine with a CUDA GPU
    python -m bench.gpu_check --dry-run  # the same checks on the CPU with the tiny preset (a test runs this)

Checks: bf16 parity with fp32; a compiled training run of `small` (tokens/s, MFU, recompiles counted);
30 generations from 4 threads across 3 cache buckets, equal to eager decoding; FlexAttention against
SDPA; peak memory. The exit status is 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from slm.attention import flex_attention_available
from slm.config import preset
from slm.devices import native_bf16
from slm.engine import Engine
from slm.flops import device_peak_flops, mfu, training_flops_per_token
from slm.model import build_model
from slm.training import LossModule

DRY_RUN_OVERRIDES = dict(vocab_size=1024)  # the tiny preset with a small vocabulary: seconds on a CPU
OVERRIDES: dict = {}


def config_for(name: str, **overrides):
    return preset(name, **{**OVERRIDES, **overrides})


@dataclass
class Result:
    name: str
    passed: bool
    numbers: str


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def check_bf16_parity(device: torch.device, name: str, batch: int, length: int) -> Result:
    """The same weights in fp32 and bf16 (and fp32 under bf16 autocast): loss and next-token agreement."""
    model = build_model(config_for(name), device=device, seed=0).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    with torch.no_grad():
        ref_logits = model(ids).float()
        ref_loss = model.loss(ids[:, :-1], ids[:, 1:]).item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            amp_loss = model.loss(ids[:, :-1], ids[:, 1:]).item()
        model.to(torch.bfloat16)
        bf16_logits = model(ids).float()
    agree = (bf16_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    rel_loss = abs(amp_loss - ref_loss) / ref_loss
    ok = agree >= 0.9 and rel_loss < 0.02 and torch.isfinite(bf16_logits).all().item()
    dtype_note = "native" if native_bf16(device) else ("emulated" if device.type == "cuda" else "CPU")
    return Result("bf16 parity with fp32", ok,
                  f"top-1 agreement {agree:.3f} (>= 0.9), autocast loss {amp_loss:.4f} vs fp32 {ref_loss:.4f} "
                  f"({rel_loss:.2%}, < 2%), bf16 {dtype_note}")


def check_compiled_training(device: torch.device, name: str, batch: int, length: int, steps: int,
                            backend: str) -> Result:
    """torch.compile of the loss (under bf16 autocast on GPU), AdamW steps: speed, MFU, recompiles."""
    config = config_for(name, context_length=length)
    model = build_model(config, device=device, seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = torch.compile(LossModule(model), backend=backend, dynamic=False)
    amp = torch.bfloat16 if native_bf16(device) else None
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (batch, length + 1), generator=gen).to(device) for _ in range(2)]
    before = graphs()
    times, losses = [], []
    for i in range(steps):
        ids = batches[i % 2]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = step(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    compiled_graphs = graphs() - before
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    tokens_per_s = batch * length / steady
    flops = training_flops_per_token(config, length)
    peak = device_peak_flops(device) if device.type == "cuda" else None
    utilisation = mfu(tokens_per_s, flops, peak)
    finite = all(torch.isfinite(x).item() for x in losses)
    ok = compiled_graphs <= 1 and finite
    mfu_text = f"MFU {utilisation:.1%}" if utilisation is not None else "MFU n/a (no peak for this device)"
    return Result(f"compiled training of {name}", ok,
                  f"{tokens_per_s:,.0f} tokens/s at batch {batch} x {length}, {mfu_text}, "
                  f"graphs compiled {compiled_graphs} (<= 1: no recompile after the first step), "
                  f"loss {losses[0].item():.3f} -> {losses[-1].item():.3f}")


def check_threaded_generation(device: torch.device, name: str, engine: Engine, new_tokens: int) -> Result:
    """30 greedy generations from 4 threads across 3 cache buckets, each against eager decoding."""
    model = build_model(config_for(name), device=device, seed=1).eval()
    lengths = (10, 100, 200)  # with the new tokens: buckets 64, 128 and 256
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    from slm.engine import generate

    expected = [generate(model, p, new_tokens, temperature=0, compiled=False) for p in prompts]
    jobs = [i % 3 for i in range(30)]
    answers: dict[int, list[int]] = {}
    errors: list[str] = []
    start = time.perf_counter()

    def worker(index: int) -> None:
        for job in range(index, len(jobs), 4):
            try:
                answers[job] = generate(model, prompts[jobs[job]], new_tokens, temperature=0, compiled=True,
                                        engine=engine)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    same = sum(answers.get(j) == expected[jobs[j]] for j in range(len(jobs)))
    ok = not errors and len(answers) == 30 and same >= 28
    return Result("30 generations, 4 threads, 3 buckets", ok,
                  f"{len(answers)}/30 answered, {same}/30 equal to eager greedy (>= 28: near ties may flip), "
                  f"{engine.compiled_count} compiled steps, {30 * new_tokens / seconds:,.0f} tokens/s overall"
                  + (f", errors: {errors[:2]}" if errors else ""))


def check_flex_vs_sdpa(device: torch.device, name: str, length: int) -> Result:
    if not flex_attention_available():
        return Result("FlexAttention vs SDPA", False, "this torch has no FlexAttention")
    model = build_model(config_for(name, context_length=length), device=device, seed=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, length + 1), device=device)
    with torch.no_grad():
        model.set_attention_backend("sdpa")
        sdpa = model.loss(ids[:, :-1], ids[:, 1:]).item()
        model.set_attention_backend("flex")
        flex = model.loss(ids[:, :-1], ids[:, 1:]).item()
    diff = abs(flex - sdpa)
    return Result("FlexAttention vs SDPA", diff < 1e-3,
                  f"loss {flex:.5f} vs {sdpa:.5f} at length {length} (window {model.config.sliding_window}), "
                  f"|diff| {diff:.2e} (< 1e-3)")


def peak_memory(device: torch.device) -> Result:
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        return Result("peak memory", used < 0.9 * total, f"{used:.2f} GiB allocated at peak of {total:.0f} GiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return Result("peak memory", True, f"{rss:.2f} GiB resident at peak (CPU)")


def run(dry_run: bool) -> list[Result]:
    if dry_run:
        OVERRIDES.update(DRY_RUN_OVERRIDES)
        device = torch.device("cpu")
        settings = dict(model="tiny", batch=2, length=32, steps=2, backend="eager", new_tokens=4)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU here: run with --dry-run for the CPU rehearsal")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        settings = dict(model="small", batch=16, length=512, steps=30, backend="inductor", new_tokens=48)
    checks: list[tuple[str, Callable[[], Result]]] = [
        ("bf16", lambda: check_bf16_parity(device, settings["model"], settings["batch"], settings["length"])),
        ("train", lambda: check_compiled_training(device, settings["model"], settings["batch"], settings["length"],
                                                  settings["steps"], settings["backend"])),
        ("generate", lambda: check_threaded_generation(device, "tiny" if dry_run else "small",
                                                       Engine(backend=settings["backend"]), settings["new_tokens"])),
        ("flex", lambda: check_flex_vs_sdpa(device, settings["model"], 128 if dry_run else 1024)),
        ("memory", lambda: peak_memory(device)),
    ]
    results = []
    for name, check in checks:
        start = time.perf_counter()
        try:
            result = check()
        except Exception as exc:  # a check that crashes fails, and the others still run
            result = Result(name, False, f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        print(f"{'PASS' if result.passed else 'FAIL'}  {result.name}: {result.numbers}  "
              f"[{time.perf_counter() - start:.1f} s]", flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the CPU rehearsal: the tiny preset with a 1024-token vocabulary, eager backend")
    args = parser.parse_args(argv)
    device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name() if torch.cuda.is_available() else "-"
    print(f"gpu_check on {device}, torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    results = run(args.dry_run)
    failed = [r.name for r in results if not r.passed]
    print(f"{'ALL PASS' if not failed else 'FAILED: ' + ', '.join(failed)} in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
