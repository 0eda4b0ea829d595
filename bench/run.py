"""The benchmark suite: ours against transformers' Gemma3ForCausalLM, measured in the same run.

    python bench/run.py                 # every section this machine can run; appends to bench/RESULTS.md
    python bench/run.py --only decode   # one section (forward, train, decode, inspect, data, gpu)
    python bench/run.py --no-record     # print only

transformers (a test/bench-only dependency) is the peer; both sides get the same weights, config,
batch and optimizer. GPU sections run only where CUDA is available.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slm
from bench.common import SHARED_TINYSTORIES, Table, append_results, interleaved
from slm.config import count_parameters, preset
from slm.devices import native_bf16
from slm.hf import config_to_hf, state_to_hf
from slm.losses import TrainingVocabulary
from slm.model import Gemma3LM


def transformers_twin(model: Gemma3LM, attn_implementation: str = "sdpa"):
    """transformers' Gemma3ForCausalLM holding exactly our model's weights."""
    import transformers

    fields = {k: v for k, v in config_to_hf(model.config).items() if k not in ("architectures", "torch_dtype", "dtype")}
    config = transformers.Gemma3TextConfig(**fields)
    config._attn_implementation = attn_implementation
    twin = transformers.Gemma3ForCausalLM(config)
    twin.load_state_dict(state_to_hf(model.export_state_dict(), model.config), strict=False)
    twin.tie_weights()
    return twin.to(device=model.device, dtype=model.dtype)


TINYSTORIES_IDS = 7_000  # about the number of GPT-2 ids TinyStories text uses (6,997 in train-first-2315.txt)


def random_tokens(batch: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)


# ----- CPU ----------------------------------------------------------------------------------------
def bench_forward(rounds: int) -> Table:
    table = Table("Forward pass, CPU fp32 (tokens/s, no grad)",
                  ["model", "batch x length", "ours", "transformers", "ours / transformers"])
    for name, batch, length in (("tiny", 8, 256), ("gemma3-270m", 4, 256)):
        model = slm.build_model(preset(name), seed=0).eval()
        twin = transformers_twin(model).eval()
        ids = random_tokens(batch, length)
        with torch.no_grad():
            t = interleaved({"ours": partial(model, ids), "theirs": partial(twin, ids)}, rounds)
        tokens = batch * length
        table.add(name, f"{batch} x {length}", tokens / t["ours"], tokens / t["theirs"], t["theirs"] / t["ours"])
    return table


def _train_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None = None,
                before_zero_grad: Callable[[], None] | None = None) -> Callable[[], None]:
    def step() -> None:
        if before_zero_grad is not None:
            before_zero_grad()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
    return step


def bench_train_cpu(rounds: int, compile_too: bool) -> list[Table]:
    tables = [_bench_train_cpu(rounds, compile_too, None)]
    if native_bf16(torch.device("cpu")):  # what train.py's "auto" precision picks on this CPU
        tables.append(_bench_train_cpu(rounds, False, torch.bfloat16))
    return tables


def _bench_train_cpu(rounds: int, compile_too: bool, autocast: torch.dtype | None) -> Table:
    precision = "fp32" if autocast is None else "bf16 autocast (both sides)"
    table = Table(f"Training step, CPU {precision} (tokens/s: forward, backward, AdamW step)",
                  ["model", "batch x length", "ours", "transformers", "ours / transformers"])
    for name, batch, length in (("tiny", 8, 256), ("gemma3-270m", 2, 256)):
        model = slm.build_model(preset(name), seed=0).train()
        twin = transformers_twin(model).train()
        data = random_tokens(batch, length + 1)
        x, y = data[:, :-1], data[:, 1:]

        def theirs_loss(x: torch.Tensor, y: torch.Tensor, twin=twin) -> torch.Tensor:
            return F.cross_entropy(twin(x).logits.flatten(0, 1), y.flatten())

        adamw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)  # what slm.training uses
        ours_opt = torch.optim.AdamW(model.parameters(), **adamw)
        theirs_opt = torch.optim.AdamW(twin.parameters(), **adamw)
        candidates = {"ours": _train_step(model.loss, ours_opt, x, y, autocast),
                      "theirs": _train_step(theirs_loss, theirs_opt, x, y, autocast)}
        if compile_too:
            candidates["ours compiled"] = _train_step(torch.compile(model.loss), ours_opt, x, y)
        if name == "tiny":  # what train.py does on TinyStories: the loss over the ids the text uses
            vocabulary = TrainingVocabulary.of_tokens(
                torch.randperm(50257, generator=torch.Generator().manual_seed(0))[:TINYSTORIES_IDS].numpy(), 50257)
            vocabulary.share_unused_rows(model.head_weight.detach())
            x_text, y_text = (vocabulary.used[t % TINYSTORIES_IDS] for t in (x, y))  # the batch, in the text's ids
            candidates["ours, text ids"] = _train_step(  # keeping the embedding's gradient buffer, as training does
                partial(model.loss, vocabulary=vocabulary), ours_opt, x_text, y_text, autocast,
                before_zero_grad=partial(vocabulary.keep_gradient, model.head_weight))
        t = interleaved(candidates, rounds)
        tokens = batch * length
        table.add(name, f"{batch} x {length}", tokens / t["ours"], tokens / t["theirs"], t["theirs"] / t["ours"])
        if "ours, text ids" in t:
            table.add(f"{name} (ours: loss over the text's {TINYSTORIES_IDS:,} ids)", f"{batch} x {length}",
                      tokens / t["ours, text ids"], tokens / t["theirs"], t["theirs"] / t["ours, text ids"])
        if compile_too:
            table.add(f"{name} (ours compiled)", f"{batch} x {length}", tokens / t["ours compiled"],
                      tokens / t["theirs"], t["theirs"] / t["ours compiled"])
    table.notes.append("both: the same fused torch.optim.AdamW; ours computes the loss with slm.losses' chunked "
                       "cross-entropy fused with the output projection")
    table.notes.append(f"'loss over the text's ids': the same full-vocabulary loss, exact, computed over the "
                       f"{TINYSTORIES_IDS:,} ids a text uses (train-first-2315.txt uses 6,997) and one shared column "
                       f"for the rest (slm.losses.TrainingVocabulary); train.py does this")
    return table


def copy_bandwidth(gigabytes: float = 1.0, rounds: int = 5) -> float:
    """Bytes moved per second (read + write) by the best of several large copies."""
    src = torch.ones(int(gigabytes * 2**30) // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def _transformers_greedy(twin, prompt: torch.Tensor, new_tokens: int) -> None:
    with torch.no_grad():
        twin.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def bench_decode_cpu(rounds: int, prompt_len: int = 128, new_tokens: int = 128) -> Table:
    table = Table(f"Decoding, CPU, batch 1, {prompt_len}-token prompt + {new_tokens} new tokens, greedy (tokens/s)",
                  ["implementation", "dtype", "tokens/s", "vs transformers", "share of bandwidth bound"])
    bandwidth = copy_bandwidth()
    for dtype in (torch.float32, torch.bfloat16):
        model = slm.build_model(preset("gemma3-270m"), seed=0, dtype=dtype).eval()
        twin = transformers_twin(model).eval()
        prompt = random_tokens(1, prompt_len)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        bound = bandwidth / weight_bytes  # each new token reads every weight once
        candidates = {
            "transformers generate": partial(_transformers_greedy, twin, prompt, new_tokens),
            "ours, default (no flag)": partial(slm.generate, model, prompt, new_tokens, temperature=0),
            "ours, eager": partial(slm.generate, model, prompt, new_tokens, temperature=0, compiled=False),
            "ours, compiled step": partial(slm.generate, model, prompt, new_tokens, temperature=0, compiled=True),
        }
        t = interleaved(candidates, rounds)
        for name, seconds in t.items():
            rate = new_tokens / seconds
            table.add(name, str(dtype).removeprefix("torch."), rate, t["transformers generate"] / seconds,
                      rate / bound)
    table.notes.append(f"bandwidth bound = copy bandwidth {bandwidth / 1e9:.1f} GB/s (a 1 GiB copy, read + write) "
                       "/ weight bytes per token; times include the prefill")
    return table


def bench_inspect(rounds: int, length: int = 256) -> Table:
    from slm import inspection

    table = Table(f"Inspect, CPU fp32: probabilities + every attention map for {length} tokens of gemma3-270m (ms)",
                  ["implementation", "ms", "transformers / ours"])
    model = slm.build_model(preset("gemma3-270m"), seed=0).eval()
    twin = transformers_twin(model, "eager").eval()
    ids = random_tokens(1, length)
    tokenizer = slm.load_tokenizer()

    def theirs() -> None:
        with torch.no_grad():
            out = twin(ids, output_attentions=True)
            torch.softmax(out.logits.float(), dim=-1)

    t = interleaved({"ours": lambda: inspection.inspect_ids(model, tokenizer, ids[0].tolist()), "theirs": theirs},
                    rounds)
    table.add("slm.inspection.inspect_ids (probabilities, top-10, entropy, attention, hidden states)", t["ours"] * 1e3,
              t["theirs"] / t["ours"])
    table.add("transformers forward, output_attentions=True, softmax", t["theirs"] * 1e3, 1.0)
    return table


def bench_data(rounds: int) -> Table:
    import tempfile

    from slm.data import DataSpec, prepare_data

    table = Table("Data preparation, CPU (MB of text per second, tokenize + write the uint16 cache)",
                  ["implementation", "MB/s", "ours / peer"])
    source = SHARED_TINYSTORIES / "train-first-2315.txt"
    if not source.is_file():
        table.notes.append(f"skipped: {source} not found")
        return table
    megabytes = source.stat().st_size / 1e6
    tokenizer = slm.load_tokenizer()
    stories = [s.strip() for s in source.read_text().split("<|endoftext|>") if s.strip()]

    def ours() -> None:
        with tempfile.TemporaryDirectory() as cache:
            prepare_data(DataSpec(str(source)), tokenizer, cache, progress=False)

    def sequential() -> None:
        ids: list[int] = []
        for story in stories:
            ids += [*tokenizer.encode_ordinary(story), tokenizer.eot_id]
        torch.tensor(ids, dtype=torch.int32).numpy().astype("uint16").tofile("/dev/null")

    t = interleaved({"ours": ours, "peer": sequential}, rounds)
    table.add(f"slm.data.prepare_data ({os.cpu_count()} threads encoding joined stories to numpy, uint16 memmap)",
              megabytes / t["ours"], t["peer"] / t["ours"])
    table.add("sequential encode_ordinary per story", megabytes / t["peer"], 1.0)
    return table


# ----- GPU ----------------------------------------------------------------------------------------
GPU_TRAIN_MODELS = (("gemma3-270m", 32768), ("small", 65536))  # (preset, tokens per batch)
GPU_CONTEXTS = (512, 1024, 2048)


def bench_gpu(rounds: int, device: torch.device | str = "cuda", models=GPU_TRAIN_MODELS,
              contexts=GPU_CONTEXTS, decode_preset: str = "gemma3-270m", new_tokens: int = 256) -> list[Table]:
    """bf16 + compile training and decoding. `device`/`models` other than the defaults only serve a
    smoke run of this code on a CPU (`--gpu-smoke`), since CI has no GPU."""
    from slm.flops import device_peak_flops, training_flops_per_token

    device = torch.device(device)
    peak = device_peak_flops(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run, not a measurement)"
    train = Table(f"Training on {where}, bf16 autocast + torch.compile",
                  ["model", "context", "batch", "tokens/s", "MFU", "transformers tokens/s", "ours / transformers"])
    for name, batch_tokens in models:
        for context in contexts:
            batch = max(1, batch_tokens // context)
            model = slm.build_model(preset(name, context_length=context), seed=0, device=device)
            twin = transformers_twin(model).to(device)
            data = random_tokens(batch, context + 1, device)
            x, y = data[:, :-1], data[:, 1:]
            fused = device.type == "cuda"
            ours_opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
            theirs_opt = torch.optim.AdamW(twin.parameters(), lr=1e-4, fused=fused)
            ours_loss = torch.compile(model.loss)

            def theirs_loss(x: torch.Tensor, y: torch.Tensor, twin=twin) -> torch.Tensor:
                return F.cross_entropy(twin(x).logits.float().flatten(0, 1), y.flatten())

            def autocast(step: Callable[[], None]) -> Callable[[], None]:
                def run() -> None:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        step()
                return run

            t = interleaved({"ours": autocast(_train_step(ours_loss, ours_opt, x, y)),
                             "theirs": autocast(_train_step(theirs_loss, theirs_opt, x, y))},
                            rounds, warmup=3, device=device)
            tokens = batch * context
            rate = tokens / t["ours"]
            mfu = f"{rate * training_flops_per_token(model.config, context) / peak:.1%}" if peak else "n/a"
            train.add(name, context, batch, rate, mfu, tokens / t["theirs"], t["theirs"] / t["ours"])
            del model, twin, ours_opt, theirs_opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if peak:
        train.notes.append(f"MFU against {peak / 1e12:.0f} TFLOP/s bf16 dense; FLOPs per token from slm.flops")

    decode = Table(f"Decoding on {where}, {decode_preset} bf16, 128-token prompt + {new_tokens} new",
                   ["batch", "ours (compiled step, CUDA graph)", "ours eager", "transformers generate",
                    "ours / transformers"])
    model = slm.build_model(preset(decode_preset), seed=0, device=device, dtype=torch.bfloat16).eval()
    twin = transformers_twin(model).eval()
    for batch in (1, 8):
        prompt = random_tokens(batch, 128, device)
        t = interleaved({
            "compiled": partial(slm.generate, model, prompt, new_tokens, temperature=0, compiled=True),
            "eager": partial(slm.generate, model, prompt, new_tokens, temperature=0, compiled=False),
            "theirs": partial(_transformers_greedy, twin, prompt, new_tokens),
        }, rounds, warmup=2, device=device)
        per_row = {k: batch * new_tokens / v for k, v in t.items()}
        decode.add(batch, per_row["compiled"], per_row["eager"], per_row["theirs"], t["theirs"] / t["compiled"])
    decode.notes.append("tokens/s counts every row of the batch; times include the prefill")
    return [train, decode]


SECTIONS = ("forward", "train", "decode", "inspect", "data", "gpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per candidate (median reported)")
    parser.add_argument("--compile", action="store_true", help="also time our CPU training step under torch.compile")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    parser.add_argument("--gpu-smoke", action="store_true",
                        help="run the GPU section's code on the CPU with the tiny preset (checks it, measures nothing)")
    args = parser.parse_args(argv)
    if args.gpu_smoke:
        for table in bench_gpu(1, "cpu", models=(("tiny", 512),), contexts=(128,), decode_preset="tiny",
                               new_tokens=8):
            print(table.text(), flush=True)
        return 0
    sections = args.only or [s for s in SECTIONS if s != "gpu" or torch.cuda.is_available()]
    print(f"parameters: gemma3-270m {count_parameters(preset('gemma3-270m')).total:,}", flush=True)
    tables: list[Table] = []
    for section in sections:
        if section == "gpu" and not torch.cuda.is_available():
            print("gpu: skipped, CUDA is not available on this machine", flush=True)
            continue
        started = time.perf_counter()
        if section == "forward":
            result = [bench_forward(args.rounds)]
        elif section == "train":
            result = bench_train_cpu(args.rounds, args.compile)
        elif section == "decode":
            result = [bench_decode_cpu(max(3, args.rounds // 2))]
        elif section == "inspect":
            result = [bench_inspect(args.rounds)]
        elif section == "data":
            result = [bench_data(args.rounds)]
        else:
            result = bench_gpu(args.rounds)
        for table in result:
            print(table.text(), flush=True)
        print(f"({section}: {time.perf_counter() - started:.0f} s)\n", flush=True)
        tables += result
    if not args.no_record and tables:
        append_results(tables, "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        print("appended to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
