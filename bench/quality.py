#!/usr/bin/env python
"""Quality proxy: train `tiny` on the shared TinyStories sample for a fixed token budget and report
the loss on `valid-first-1000.txt`, for AdamW and Muon side by side (tokens-to-loss).

    python bench/quality.py --tokens 500000                      # both optimizers
    python bench/quality.py --tokens 2000000 --optimizer muon --notes bench/QUALITY.md

The final loss is measured on every token of the validation file (non-overlapping windows of the
context length); "tokens to loss X" reads the periodic evaluations on a fixed subset of it.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slm.data import iter_file_stories  # noqa: E402
from slm.loading import load_model  # noqa: E402
from slm.tokenizer import load_tokenizer  # noqa: E402
from slm.train_config import TrainConfig  # noqa: E402
from slm.training import read_metrics, train  # noqa: E402

SHARED = REPO / ".." / "shared" / "data" / "tinystories"
THRESHOLDS = (6.0, 5.5, 5.0, 4.5, 4.0)  # validation losses a short CPU run passes


@torch.no_grad()
def full_validation_loss(run_dir: Path, val_file: Path, context: int, batch: int) -> float:
    """Mean next-token loss over every token of `val_file` (stories joined by <|endoftext|>), in
    non-overlapping windows of `context` tokens."""
    model = load_model(run_dir / "latest")
    tokenizer = load_tokenizer()
    ids: list[int] = []
    for story in tokenizer.encode_batch(list(iter_file_stories(val_file))):
        ids += [*story, tokenizer.eot_id]
    tokens = torch.tensor(ids, dtype=torch.long)
    windows = (tokens.numel() - 1) // context
    inputs = tokens[: windows * context].view(windows, context)
    targets = tokens[1 : windows * context + 1].view(windows, context)
    total = 0.0
    for lo in range(0, windows, batch):
        x, y = inputs[lo : lo + batch].to(model.device), targets[lo : lo + batch].to(model.device)
        total += model.loss(x, y).item() * x.shape[0]
    return total / windows


def tokens_to(records: list[dict], threshold: float) -> int | None:
    for record in records:
        if record.get("kind") == "train" and record.get("val_loss") is not None and record["val_loss"] <= threshold:
            return record["tokens"]
    return None


def run_one(optimizer: str, args: argparse.Namespace, workdir: Path) -> dict:
    config = TrainConfig(
        preset="tiny", data=str(args.train_file), val_data=str(args.val_file), max_tokens=args.tokens,
        batch_size=args.batch_size, context_length=args.context_length, optimizer=optimizer, lr=args.lr,
        warmup_steps=args.warmup_steps, eval_every=args.eval_every, eval_batches=4, log_every=10,
        sample_tokens=0, seed=args.seed, device=args.device, out=str(workdir / optimizer),
        cache_dir=str(workdir / "cache"),
    )
    started = time.perf_counter()
    result = train(config, progress=True)
    seconds = time.perf_counter() - started
    full = full_validation_loss(result.run_dir, args.val_file, args.context_length, 16)
    records = read_metrics(result.run_dir)
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r["step"] > 1]
    return {
        "optimizer": optimizer, "tokens": result.tokens, "steps": result.step, "seconds": seconds,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else float("nan"), "train_loss": result.train_loss,
        "val_loss": full, "to": {t: tokens_to(records, t) for t in THRESHOLDS},
    }


def table(rows: list[dict]) -> str:
    head = ["optimizer", "tokens", "steps", "time (s)", "tokens/s", "train loss", "valid loss", "valid ppl"]
    head += [f"tokens to {t}" for t in THRESHOLDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["optimizer"], f"{r['tokens']:,}", str(r["steps"]), f"{r['seconds']:.0f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['train_loss']:.3f}", f"{r['val_loss']:.3f}",
                 f"{math.exp(r['val_loss']):.1f}"]
        cells += [f"{r['to'][t]:,}" if r["to"][t] else "-" for t in THRESHOLDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = "unknown"
    return f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, revision {revision}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=500_000, help="training tokens per optimizer")
    p.add_argument("--optimizer", nargs="+", choices=["adamw", "muon"], default=["adamw", "muon"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--train-file", type=Path, default=SHARED / "train-first-2315.txt")
    p.add_argument("--val-file", type=Path, default=SHARED / "valid-first-1000.txt")
    p.add_argument("--notes", type=Path, help="append the table, with machine and date, to this file")
    args = p.parse_args()
    for path in (args.train_file, args.val_file):
        if not path.is_file():
            print(f"error: {path} not found (the shared TinyStories sample lives in ../shared/data)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="slm-quality-") as tmp:
        rows = [run_one(name, args, Path(tmp)) for name in args.optimizer]
    settings = (f"tiny, lr {args.lr}, batch {args.batch_size} x {args.context_length} tokens, "
                f"warmup {args.warmup_steps}, cosine to lr/10, seed {args.seed}; valid loss on every token of "
                f"{args.val_file.name}")
    report = f"### Quality proxy ({machine()})\n\n{settings}\n\n{table(rows)}\n"
    print("\n" + report)
    if args.notes:
        with open(args.notes, "a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
