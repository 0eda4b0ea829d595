#!/usr/bin/env python
"""Train a Gemma 3-style small language model on TinyStories (or your own text).

    python train.py                                   # the tiny preset on TinyStories from the hub
    python train.py --data stories.txt --max-steps 300
    python train.py --resume checkpoints/tiny-20250101-120000 --max-steps 600
    python train.py --init-from google/gemma-3-270m --max-steps 100   # continue an imported model
    torchrun --nproc_per_node=4 train.py --preset small --max-tokens 500_000_000

Ctrl-C finishes the current step, saves and exits; `--resume RUN` continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# flags that may change when a run is resumed; everything else would make it a different run
RESUMABLE_OVERRIDES = (
    "max_steps", "max_tokens", "max_time", "device", "dtype", "compile", "eval_every", "save_every", "log_every",
)


def duration(text: str) -> float:
    from slm.train_config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from slm.train_config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, GPU_RECIPES, TrainConfig

    gpu_batches = ", ".join(f"{name} {recipe['batch_size']}" for name, recipe in GPU_RECIPES.items())
    d = TrainConfig  # the defaults shown in the help are TrainConfig's: one source for CLI, API and UI
    p = argparse.ArgumentParser(
        description="Train a Gemma 3-style language model from scratch (see slm/train_config.py for every knob).",
        epilog="Values in [brackets] are the defaults.",
    )
    model = p.add_argument_group("model")
    model.add_argument("--preset", help="model size: tiny (11.8M), small (56M) or gemma3-270m (132.5M) [tiny]")
    model.add_argument("--context-length", type=int, help="tokens per training sequence [the preset's; 512 with "
                       "--init-from]")
    model.add_argument("--init-from", metavar="FOLDER_OR_REPO",
                       help="continue training this model (a checkpoint folder, a transformers Gemma 3 folder or "
                       "a Hub repo id) with its own tokenizer and vocabulary, instead of a fresh --preset")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="hub dataset name, or a local .txt/.jsonl/.json/.parquet file or folder "
                      "[roneneldan/TinyStories]")
    data.add_argument("--val-data", help="separate validation text [hold out 1%% of --data]")
    data.add_argument("--max-stories", type=int, help="use only the first N stories (streamed from the hub)")
    data.add_argument("--text-field", help="field holding the text in .jsonl/.json/.parquet/hub data [text]")
    data.add_argument("--cache-dir", help="where tokenized data is cached [.cache/slm-data]")
    length = p.add_argument_group("length (one of)").add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="optimizer steps [2000]")
    length.add_argument("--max-tokens", type=int, help="training tokens, converted to steps")
    p.add_argument("--max-time", type=duration, metavar="TIME",
                   help="train for this long: seconds (300) or 90s, 10m, 1h; the learning rate decays to the "
                   "end of this budget (wall time, evaluations included); with --max-steps/--max-tokens, "
                   "whichever ends first")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int,
                     help=f"sequences per device per micro-step [{CPU_BATCH_SIZE} on CPU; on a GPU the preset's "
                     f"recipe ({gpu_batches}), else {GPU_BATCH_SIZE}]")
    opt.add_argument("--grad-accum", type=int, help=f"micro-steps per optimizer step [{d.grad_accum}]")
    opt.add_argument("--optimizer", choices=["adamw", "muon"],
                     help=f"muon: Muon for the blocks' matrices, AdamW for the rest [{d.optimizer}]")
    opt.add_argument("--lr", type=float, help=f"peak learning rate of the blocks' matrices and norms [{d.lr:g}]")
    opt.add_argument("--embedding-lr", type=float,
                     help=f"peak learning rate of the token embedding [{d.embedding_lr or 'lr'}]")
    opt.add_argument("--schedule", choices=["wsd", "cosine"],
                     help=f"after warmup: wsd holds the peak, then decays linearly; cosine decays all along "
                     f"[{d.schedule}]")
    opt.add_argument("--decay-fraction", type=float, help=f"wsd: share of the run spent decaying [{d.decay_fraction}]")
    opt.add_argument("--min-lr", type=float, help="learning rate at the last step [0 with wsd, lr / 10 with cosine]")
    opt.add_argument("--warmup-steps", type=int,
                     help="linear warmup steps [5%% of the steps; with --max-time alone, the first 5%% of the time]")
    opt.add_argument("--beta1", type=float, help=f"AdamW's first-moment decay [{d.beta1}]")
    opt.add_argument("--beta2", type=float, help=f"AdamW's second-moment decay [{d.beta2}]")
    opt.add_argument("--late-beta1", type=float, help=f"AdamW's beta1 from --late-betas-from-pass on [{d.late_beta1}]")
    opt.add_argument("--late-beta2", type=float, help=f"AdamW's beta2 from --late-betas-from-pass on [{d.late_beta2}]")
    opt.add_argument("--late-betas-from-pass", type=int, metavar="PASS",
                     help=f"the pass over the training text (1 = the first; 0 = never) from which AdamW uses the "
                     f"late betas: they memorise less of a text seen many times [{d.late_betas_from_pass}]")
    opt.add_argument("--muon-momentum", type=float, help=f"Muon's momentum [{d.muon_momentum}]")
    opt.add_argument("--weight-decay", type=float, help=f"[{d.weight_decay}]")
    opt.add_argument("--embedding-init", choices=["cooccurrence", "normal"],
                     help=f"where a fresh model's token embedding starts: cooccurrence = word vectors counted "
                     f"from the training text (PPMI + SVD), normal = random [{d.embedding_init}]")
    opt.add_argument("--grad-clip", type=float, help=f"gradient norm clip, 0 = off [{d.grad_clip}]")
    opt.add_argument("--dropout", type=float,
                     help=f"share of each block branch's output dropped in training, from --dropout-from-pass "
                     f"on (never at inference) [{d.dropout}]")
    opt.add_argument("--dropout-from-pass", type=int, metavar="PASS",
                     help=f"the pass over the training text (1 = the first; 0 = never) from which the blocks' "
                     f"branches are dropped [{d.dropout_from_pass}]")
    opt.add_argument("--embedding-dropout", type=float,
                     help=f"the same for each element of the embedded input tokens, from "
                     f"--embedding-dropout-from-pass on [{d.embedding_dropout}]")
    opt.add_argument("--embedding-dropout-from-pass", type=int, metavar="PASS",
                     help=f"the pass over the training text (1 = the first; 0 = never) from which the embedded "
                     f"input is dropped: it costs while the text is still new [{d.embedding_dropout_from_pass}]")
    opt.add_argument("--unlikelihood", type=float, metavar="WEIGHT",
                     help=f"weight of sequence-level unlikelihood: the model continues the starts of its windows "
                     f"greedily and is trained away from the tokens that repeat an earlier n-gram, so that its "
                     f"greedy text loops less; 0 = off [{d.unlikelihood}]")
    opt.add_argument("--unlikelihood-share", type=float, metavar="SHARE",
                     help=f"the last share of the run (steps or time budget) that adds it [{d.unlikelihood_share}]")
    opt.add_argument("--unlikelihood-ngram", type=int, metavar="N",
                     help=f"the length of a repeat that counts: 8 marks loops, 4 also the short repeats stories "
                     f"use on purpose [{d.unlikelihood_ngram}]")
    run = p.add_argument_group("run")
    run.add_argument("--out", help="run folder [checkpoints/<preset>-<date>-<time>]")
    run.add_argument("--resume", nargs="?", const=True, metavar="RUN",
                     help="continue the run in RUN (or in --out) from its latest checkpoint")
    run.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps [auto]")
    run.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                     help="autocast precision; weights stay fp32 [auto: bf16 or fp16 on GPUs; on a CPU, bf16 "
                          "where it has bf16 instructions (AVX512-BF16, AMX), else fp32]")
    run.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    run.add_argument("--eval-every", type=int, help="steps between evaluations [a tenth of the run]")
    run.add_argument("--eval-batches", type=int, help="fixed validation batches per evaluation [8]")
    run.add_argument("--log-every", type=int, help="steps between metrics records [10]")
    run.add_argument("--save-every", type=int, help="steps between resumable checkpoints [--eval-every]")
    run.add_argument("--seed", type=int, help="[1337]")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Any:
    from slm.train_config import TrainConfig, read_run_record, resume_config

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "quiet")}
    if args.resume is None:
        return TrainConfig(**given)
    run_dir = args.out if args.resume is True else args.resume
    if run_dir is None:
        raise ValueError("--resume needs the run folder: --resume RUN (or --resume --out RUN)")
    recorded = read_run_record(run_dir)
    changed = sorted(name for name in set(given) - set(RESUMABLE_OVERRIDES) - {"out"}
                     if given[name] != recorded.get(name))  # the run's own value, repeated, is no change
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ValueError(f"{flags} cannot change when resuming (the run would no longer be the same run); "
                         f"only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE_OVERRIDES)} can")
    return resume_config(run_dir, **{k: v for k, v in given.items() if k in RESUMABLE_OVERRIDES})


def clock(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)}m{seconds:04.1f}s"


def summary(result: Any) -> str:
    def loss(value: float | None, bpb: float | None = None) -> str:
        text = "-" if value is None else f"{value:.4f}"
        return text + (f" ({bpb:.3f} bits/byte)" if bpb is not None else "")

    steps = f"{result.step:,}" + (f"/{result.max_steps:,}" if result.max_steps is not None else "")
    budget = f" of a {clock(result.max_time)} budget" if result.max_time is not None else ""
    lines = [
        "",
        f"{'stopped' if result.stopped else 'finished'} at step {steps} ({result.tokens:,} tokens) "
        f"in {clock(result.elapsed_s)}{budget}"
        + (f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else ""),
        f"  train loss {loss(result.train_loss, result.train_bpb)}   "
        f"val loss {loss(result.val_loss, result.val_bpb)}   best val loss {loss(result.best_val_loss)}",
        f"  run folder   {result.run_dir}",
    ]
    if result.checkpoint is None:
        lines.append("  nothing was trained, so nothing was saved")
        return "\n".join(lines)
    lines += [
        f"  checkpoint   {result.checkpoint}   (best: {result.run_dir / 'best'})",
        f"  loss plot    {result.run_dir / 'loss.png'}",
        f"  samples      {result.run_dir / 'samples.jsonl'}",
    ]
    unfinished = result.step < result.max_steps if result.max_steps is not None else result.elapsed_s < result.max_time
    if result.stopped or unfinished:
        lines.append(f"  continue     python train.py --resume {result.run_dir}")
    return "\n".join(lines)


PRECISIONS = {"float32": "fp32", "bfloat16": "bf16 autocast", "float16": "fp16 autocast"}


def start_line(record: dict[str, Any]) -> str:
    """What the run is about to do, and on what: the first thing a terminal shows after data preparation."""
    where = f"{record['device']}, {PRECISIONS.get(record['precision'], record['precision'])}"
    what = (f"{record['parameters']:,} parameters, {record['tokens_per_step']:,} tokens per step, "
            f"{record['train_tokens']:,} training tokens")
    if record.get("trained_columns", 0) < record.get("vocabulary", 0):  # the loss runs over the text's ids
        what += f" (the text uses {record['trained_columns'] - 1:,} of the {record['vocabulary']:,} token ids)"
    if record.get("embedding_from_text_s") is not None:
        seconds = record["embedding_from_text_s"]
        what += f"; the embedding starts from the text's co-occurrence vectors ({seconds:.1f} s)"
    resumed = f", resuming at step {record['step']:,}" if record.get("resumed") else ""
    return f"training on {where}: {what}{resumed}"


def plain_error(exc: BaseException) -> str:
    """One line for an error torch raises, saying what to do when it is about memory."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or "allocate" in text.lower():
        return (f"not enough memory for this run ({text[:200]}); use a smaller --batch-size, --context-length "
                "or --preset")
    return f"{type(exc).__name__}: {text[:300]}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from slm.checkpoint import CheckpointError
    from slm.data import DataError
    from slm.plots import write_run_loss_plot
    from slm.training import read_metrics, train

    def draw_loss_plot(run_dir: Path) -> None:
        write_run_loss_plot(run_dir, read_metrics(run_dir))

    def announce(record: dict[str, Any]) -> None:
        if record.get("kind") == "start":
            print(start_line(record), flush=True)

    try:
        config = build_config(args)
        result = train(config, progress=not args.quiet, on_save=draw_loss_plot,
                       on_metrics=None if args.quiet else announce)
    except (DataError, CheckpointError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\naborted without saving; the last saved checkpoint is intact", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # an allocator or device failure: one line, not a traceback
        print(f"error: {plain_error(exc)}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 speaks for all
        print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
