"""bench/gpu_check.py's CPU rehearsal runs every check and passes."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_passes():
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    for check in ("bf16 parity", "compiled training", "30 generations", "FlexAttention vs SDPA", "peak memory"):
        assert f"PASS  {check}" in done.stdout
    assert "ALL PASS" in done.stdout
