#!/usr/bin/env python
"""The quality judge: our default recipe against transformers' Gemma3ForCausalLM of the same size,
trained by a plain AdamW loop (bench/peer.py) on the same TinyStories sample, at fixed token budgets
and at fixed wall-clock budgets. Held-out loss and bits per byte on every token of valid-first-1000.txt.

    python bench/quality.py --notes bench/QUALITY.md      # the whole judge (~90 min)
    python bench/quality.py --budgets 400k 5m --peer-lr 2e-3                   # some budgets only

On a quiet machine each side trains alone with all of the machine's threads, one after the other:
what `train.py --max-time 300` gets on it. With --together both sides train at the same time in
processes of one thread each, so that a busy machine slows both alike. The first budget sweeps the
peer's learning rate (one run per value of --peer-lr); the later budgets give the peer the best of
them. The time budgets count the whole wall time of each loop (our evaluations and samples
included); the held-out scoring follows. Rows are appended to --rows as they finish, so a run cut
short keeps what it measured; `--table ROWS` prints the table of such a file. --keep DIR keeps our
time-boxed runs' folders (checkpoints, samples) as DIR/quality-5m and DIR/quality-15m.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import cpu_name, git_revision  # noqa: E402

DEFAULT_BUDGETS = ("400k", "5m", "15m", "1M")


def parse_budget(text: str) -> tuple[int | None, float | None]:
    """"400k" / "1M" tokens, or "5m" / "90s" / "1h" of wall time -> (tokens, seconds)."""
    if text[-1] in "kM":
        return int(float(text[:-1]) * (1000 if text[-1] == "k" else 1_000_000)), None
    from slm.train_config import parse_duration

    return None, parse_duration(text)


def one_side(side: str, budget: str, lr: float | None, out: Path, greedy_file: Path | None,
             val_limit: int | None, keep: Path | None) -> None:
    """Train one side for one budget in this process and append its row to `out`."""
    tokens, seconds = parse_budget(budget)
    if side == "ours":
        from bench.sweep import train_ours

        with tempfile.TemporaryDirectory(prefix="slm-quality-") as tmp:
            # the defaults, as a user gets them: periodic evaluations and samples count against a time budget
            setting = {"eval_batches": 8, "sample_tokens": 64}
            row = train_ours(setting, tokens, seconds, Path(tmp), val_limit)
            if greedy_file is not None:
                from slm.loading import load_model
                from slm.sampling import generate
                from slm.tokenizer import load_tokenizer

                model, tokenizer = load_model(row["run_dir"] / "latest"), load_tokenizer()
                texts = []
                for prompt in ("Once upon a time", "Tom and his mom", "Lily saw a"):
                    new = generate(model, tokenizer.encode(prompt), max_new_tokens=120, temperature=0.0,
                                   stop_token_ids=[tokenizer.eot_id])
                    texts.append(prompt + tokenizer.decode([t for t in new if t != tokenizer.eot_id]))
                greedy_file.write_text(json.dumps({"budget": budget, "texts": texts}, indent=1) + "\n")
            if keep is not None and seconds is not None:
                import shutil

                target = keep / f"quality-{budget}"
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(row["run_dir"], target)
    else:
        from bench.peer import train_peer

        row = train_peer(lr=lr, tokens=tokens, seconds=seconds, val_limit=val_limit)
    row = {k: v for k, v in row.items() if k != "run_dir"}
    row.update(side=side, budget=budget, lr=lr if side == "peer" else None)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def table(rows: list[dict[str, Any]]) -> str:
    head = ["budget", "side", "tokens", "steps", "time (s)", "tokens/s", "valid loss", "valid bpb", "load 1/5/15"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = "ours (defaults)" if r["side"] == "ours" else f"transformers AdamW lr {r['lr']:g}"
        lines.append(f"| {r['budget']} | {name} | {r['tokens']:,} | {r['steps']:,} | {r['seconds']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['loss']:.3f} | {r['bpb']:.3f} | {r['load']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS), help="e.g. 400k 1M 5m 15m")
    p.add_argument("--peer-lr", type=float, nargs="+", default=[5e-3, 1e-2, 2e-2],
                   help="the peer's learning rates, swept at the first budget")
    p.add_argument("--val-tokens", type=int, default=0,
                   help="held-out tokens scored (0, the default: every token of the file; its first 65,536 are "
                        "easier than the whole, 2.75 against 3.00 for one model)")
    p.add_argument("--rows", type=Path, default=Path("quality-rows.jsonl"), help="where rows are appended")
    p.add_argument("--greedy", type=Path, help="write the greedy text of the 5-minute model here")
    p.add_argument("--notes", type=Path, help="append the table, with machine and date, to this file")
    p.add_argument("--table", type=Path, help="only print the table of a rows file")
    p.add_argument("--together", action="store_true",
                   help="train both sides at once, one thread each (a busy machine slows both alike)")
    p.add_argument("--keep", type=Path, help="copy our time-boxed runs' folders here")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)  # one side, in a child process
    args = p.parse_args()
    if args.side:
        one_side(args.side, args.budgets[0], args.peer_lr[0], args.rows, args.greedy, args.val_tokens or None,
                 args.keep)
        return 0
    if args.table is None:
        peer_lrs = list(args.peer_lr)
        for k, budget in enumerate(args.budgets):
            env = dict(os.environ, PYTHONPATH=str(REPO), **({"OMP_NUM_THREADS": "1"} if args.together else {}))
            base = [sys.executable, __file__, "--budgets", budget, "--rows", str(args.rows),
                    "--val-tokens", str(args.val_tokens)]
            greedy = ["--greedy", str(args.greedy)] if args.greedy and budget == "5m" else []
            keep = ["--keep", str(args.keep)] if args.keep else []
            commands = [[*base, "--side", "ours", *greedy, *keep]]
            commands += [[*base, "--side", "peer", "--peer-lr", str(lr)] for lr in peer_lrs]
            if args.together:
                codes = [c.wait() for c in [subprocess.Popen(command, env=env) for command in commands]]
            else:
                codes = [subprocess.run(command, env=env).returncode for command in commands]
            print(f"{time.strftime('%H:%M:%S')} budget {budget}: exit codes {codes}", flush=True)
            if k == 0 and len(peer_lrs) > 1:  # the peer's sweep: keep its best learning rate
                rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
                swept = [r for r in rows if r["side"] == "peer" and r["budget"] == budget]
                if swept:
                    peer_lrs = [min(swept, key=lambda r: r["loss"])["lr"]]
                    print(f"the peer's best learning rate at {budget}: {peer_lrs[0]:g}", flush=True)
    rows = [json.loads(line) for line in (args.table or args.rows).read_text().splitlines() if line.strip()]
    mode = "both sides at once, one thread each" if args.together else "each side alone, all threads"
    report = (f"### Quality judge ({time.strftime('%Y-%m-%d')}, {cpu_name()}, {mode}, revision {git_revision()})\n\n"
              f"{table(rows)}\n")
    print("\n" + report)
    if args.notes:
        with open(args.notes, "a") as f:
            f.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
