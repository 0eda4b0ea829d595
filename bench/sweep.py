#!/usr/bin/env python
"""Recipe sweep: train `tiny` (or another preset) on the shared TinyStories sample for a fixed token
budget with several settings, and print one table row per setting: held-out loss and bits per byte,
time, throughput and the machine load. The token budget makes the result independent of the load.

    python bench/sweep.py --tokens 200000 \\
        --run "optimizer=adamw,lr=1e-3" --run "optimizer=muon,lr=1e-2,embedding_lr=3e-2"
    python bench/sweep.py --tokens 400000 --peer-lr 1e-3 2e-3 4e-3   # the transformers AdamW loop
    python bench/sweep.py --seconds 150 --run "" --run "model.num_layers=6"    # equal wall time

A setting is `field=value` pairs of TrainConfig (`model.FIELD=value` for ModelConfig overrides,
`init=zero-out` to start the attention and MLP output projections at zero).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.heldout import heldout_score  # noqa: E402
from slm.train_config import TrainConfig  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "tinystories"
TRAIN_FILE, VAL_FILE = SHARED / "train-first-2315.txt", SHARED / "valid-first-1000.txt"


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_setting(spec: str) -> dict[str, Any]:
    setting: dict[str, Any] = {}
    for pair in filter(None, spec.split(",")):
        key, _, value = pair.partition("=")
        setting[key.strip()] = parse_value(value.strip())
    return setting


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def train_ours(setting: dict[str, Any], tokens: int | None, seconds: float | None, workdir: Path,
               val_limit: int | None) -> dict[str, Any]:
    """Train with our loop and score the result on the held-out text."""
    import slm.training as training
    from slm.loading import load_model

    setting = dict(setting)
    init = setting.pop("init", None)
    model = {k.removeprefix("model."): setting.pop(k) for k in list(setting) if k.startswith("model.")}
    values: dict[str, Any] = dict(
        preset="tiny", data=str(TRAIN_FILE), val_data=str(VAL_FILE), max_tokens=tokens, max_time=seconds,
        eval_batches=2, sample_tokens=0, device="cpu", cache_dir=str(REPO / ".cache" / "slm-data"),
        out=str(workdir / f"run-{time.time_ns()}"), log_every=50,
    )
    values.update(setting)
    if model:
        values["model"] = {**values.get("model", {}), **model}
    if values.get("eval_every") is None:
        values["eval_every"] = 10**9  # only the final evaluation
    config = TrainConfig(**values)
    original = training.build_model
    if init == "zero-out":
        def build_zero_out(*args: Any, **kwargs: Any) -> Any:
            m = original(*args, **kwargs)
            for layer in m.layers:
                layer.self_attn.o_proj.weight.data.zero_()
                layer.mlp.down_proj.weight.data.zero_()
            return m
        training.build_model = build_zero_out
    load_before = load()
    started = time.perf_counter()
    try:
        result = training.train(config)
    finally:
        training.build_model = original
    wall = time.perf_counter() - started
    model_ = load_model(result.run_dir / "latest")
    context = config.context_length or model_.config.context_length
    loss, bpb = heldout_score(lambda x: model_(x), VAL_FILE, context, limit=val_limit)
    return {"tokens": result.tokens, "steps": result.step, "seconds": wall, "tokens_per_s": result.tokens_per_s,
            "loss": loss, "bpb": bpb, "load": f"{load_before} -> {load()}", "run_dir": result.run_dir}


def row(name: str, r: dict[str, Any]) -> str:
    return (f"| {name} | {r['tokens']:,} | {r['steps']} | {r['seconds']:.0f} | {r['tokens_per_s'] or 0:,.0f} | "
            f"{r['loss']:.3f} | {r['bpb']:.3f} | {r['load']} |")


HEAD = ("| setting | tokens | steps | time (s) | tokens/s | valid loss | valid bpb | load 1/5/15 min |\n"
        "|---|---|---|---|---|---|---|---|")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--seconds", type=float, help="a wall-clock budget instead of --tokens (compares shapes fairly)")
    p.add_argument("--run", action="append", default=[], help="a setting: field=value,field=value")
    p.add_argument("--peer-lr", type=float, nargs="*", default=[], help="transformers AdamW loop learning rates")
    p.add_argument("--peer-betas", type=float, nargs=2, default=[0.9, 0.95], metavar=("BETA1", "BETA2"),
                   help="the transformers loop's AdamW betas (the judge's are 0.9 0.95)")
    p.add_argument("--val-tokens", type=int, default=65_536, help="held-out tokens scored (0: all)")
    p.add_argument("--log", type=Path, help="append each row to this file as it is measured")
    args = p.parse_args()
    limit = args.val_tokens or None
    print(HEAD, flush=True)
    with tempfile.TemporaryDirectory(prefix="slm-sweep-") as tmp:
        rows = []
        for spec in args.run:
            tokens = None if args.seconds else args.tokens
            r = train_ours(parse_setting(spec), tokens, args.seconds, Path(tmp), limit)
            rows.append(row(spec or "defaults", r))
            print(rows[-1], flush=True)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(rows[-1] + "\n")
        for lr in args.peer_lr:
            from bench.peer import train_peer

            r = train_peer(lr=lr, tokens=None if args.seconds else args.tokens, seconds=args.seconds, val_limit=limit,
                           betas=tuple(args.peer_betas))
            rows.append(row(f"transformers AdamW lr={lr}, betas={tuple(args.peer_betas)}", r))
            print(rows[-1], flush=True)
            if args.log:
                with open(args.log, "a") as f:
                    f.write(rows[-1] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
