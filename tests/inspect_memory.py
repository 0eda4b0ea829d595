"""Run by tests and the benchmark in a fresh process: peak resident memory while inspecting a text.

Prints one JSON line: the tokens inspected, the resident memory before, and the peak while
inspecting (Linux: the high-water mark is reset through /proc/self/clear_refs first).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slm
from slm.inspection import inspect_ids, logit_lens


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    folder, tokens = sys.argv[1], int(sys.argv[2])
    lm = slm.load(folder)
    words = "Once upon a time, there was a little girl named Lily. She had a red kite. " * 200
    ids = (lm.tokenizer.encode(words) * tokens)[:tokens]  # repeated: the test tokenizer merges whole phrases
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident size
    before = status_mb("VmRSS")
    start = time.perf_counter()
    inspection = inspect_ids(lm.model, lm.tokenizer, ids, top_k=10)
    seconds = time.perf_counter() - start
    for position in (0, len(ids) // 2, len(ids) - 1):
        logit_lens(lm.model, lm.tokenizer, inspection, position)
    print(json.dumps({"tokens": len(inspection), "before_mb": before, "peak_mb": status_mb("VmHWM"),
                      "inspect_s": seconds, "vocab": lm.model.config.vocab_size}))


if __name__ == "__main__":
    main()
