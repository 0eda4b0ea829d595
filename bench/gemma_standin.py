"""Gemma 3 270M's exact dimensions with its 262,144-token vocabulary (random weights), on this machine:
generation speed, inspect latency for 256 tokens, and the memory each takes above the loaded model,
ours beside transformers' Gemma3ForCausalLM holding the same weights.

    python bench/gemma_standin.py                  # fp32 and bf16; prints a table
    python bench/gemma_standin.py --dtypes fp32 --rounds 1

The real weights are not reachable from here; a random model of the same shape costs the same time
and memory. The tokenizer is a 262,144-entry tokenizer.json made by tests/gemma_helpers.py (Gemma's
layout: byte fallback, special ids), so inspect's display strings are real work too. Peak memory is
Linux's resident high-water mark (reset through /proc/self/clear_refs before each measurement).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import slm  # noqa: E402
from bench.common import Table, machine_description  # noqa: E402
from bench.run import transformers_twin  # noqa: E402
from slm.config import count_parameters, preset  # noqa: E402
from slm.inspection import inspect_ids, logit_lens  # noqa: E402

VOCAB = 262_144
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_above(fn) -> tuple[float, float]:
    """(seconds, peak resident MB above the resident size before) of one call."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mb("VmRSS")
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, status_mb("VmHWM") - before


def timed(fn, rounds: int) -> tuple[float, float]:
    """Median seconds over `rounds` calls after one warm-up call, and the largest peak memory of them."""
    fn()
    results = [peak_above(fn) for _ in range(rounds)]
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def standin_tokenizer(folder: Path) -> slm.Tokenizer:
    from gemma_helpers import write_gemma_tokenizer

    write_gemma_tokenizer(folder, vocab_size=VOCAB)
    return slm.load_tokenizer(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=1, help="measured calls per line, after one warm-up")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens for generation")
    parser.add_argument("--new", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--inspect", type=int, default=256, help="tokens inspected")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = standin_tokenizer(Path(tmp))
    config = preset("gemma3-270m", vocab_size=VOCAB, context_length=2048)
    text = "Once upon a time, there was a little girl named Lily. She had a red kite. " * 20
    ids = (tokenizer.encode(text) * 1000)
    prompt = torch.tensor([ids[: args.prompt]])
    inspected = ids[: args.inspect]
    gen = Table(f"Gemma 3 270M stand-in ({count_parameters(config).total:,} parameters, vocabulary {VOCAB:,}): "
                f"generation, batch 1, {args.prompt}-token prompt + {args.new} new tokens",
                ["implementation", "dtype", "tokens/s", "peak MB above the model"])
    ins = Table(f"Gemma 3 270M stand-in: inspecting {args.inspect} tokens",
                ["implementation", "dtype", "ms", "peak MB above the model"])
    for name in args.dtypes:
        dtype = DTYPES[name]
        before = status_mb("VmRSS")
        model = slm.build_model(config, seed=0, dtype=dtype).eval()
        model_mb = status_mb("VmRSS") - before
        twin = transformers_twin(model, "eager").eval()

        def ours_greedy(model=model):
            slm.generate(model, prompt, args.new, temperature=0, compiled=False)

        def ours_sampled(model=model):
            slm.generate(model, prompt, args.new, temperature=0.8, top_k=50, top_p=0.95, seed=0, compiled=False)

        def theirs_greedy(twin=twin):
            with torch.no_grad():
                twin.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                              pad_token_id=0)

        def ours_inspect(model=model):
            inspection = inspect_ids(model, tokenizer, inspected, top_k=10)
            logit_lens(model, tokenizer, inspection, len(inspected) - 1)

        def theirs_inspect(twin=twin):  # the same numbers from transformers: every logit, attention and state
            with torch.no_grad():
                out = twin(torch.tensor([inspected]), output_attentions=True, output_hidden_states=True)
                log_probs = torch.log_softmax(out.logits.float(), dim=-1)
                torch.topk(log_probs, 10, dim=-1)
                -(log_probs.exp() * log_probs).sum(-1)

        for label, fn in (("ours greedy", ours_greedy), ("ours sampled (T 0.8, top-k 50, top-p 0.95)", ours_sampled),
                          ("transformers generate, greedy", theirs_greedy)):
            seconds, peak = timed(fn, args.rounds)
            gen.add(label, name, args.new / seconds, peak)
        for label, fn in (("ours: inspect_ids + logit lens at one position", ours_inspect),
                          ("transformers forward (attentions, hidden states) + log-softmax, top-10, entropy",
                           theirs_inspect)):
            seconds, peak = timed(fn, args.rounds)
            ins.add(label, name, seconds * 1e3, peak)
        gen.notes.append(f"{name}: the model itself takes {model_mb:,.0f} MB resident")
        print(gen.text(), ins.text(), sep="\n", flush=True)  # so far (a slow machine may not reach the end)
        del model, twin
        gc.collect()
    for table in (gen, ins):
        table.notes.append(f"{machine_description()}; median of {args.rounds} call(s) after a warm-up call; times "
                           "include the prefill; peak = resident high-water mark during a measured call")
        print(table.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
