"""benchmarks/dit.py runs on narrow Flux and SD3 architectures and prints its table."""

import subprocess
import sys
from pathlib import Path

import headless
import pytest

REPO = Path(__file__).resolve().parents[1]
RUNS = ["unpatched", "router, pass-through technique", "StyleAligned", "AttentionRecorder"]


@pytest.mark.parametrize("model, name", [("flux", "Flux"), ("sd3", "SD3.5 Medium")])
def test_dit_benchmark_smoke(model, name):
    if headless.find_comfyui()[0] is None:
        pytest.skip(headless.find_comfyui()[1])
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dit.py"), "--model", model, "--narrow", "--cpu",
                           "--size", "64", "--text-tokens", "8", "--steps", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"model: {name} architecture 128 wide (narrow)" in done.stdout, done.stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith(f"| {name} |")]
    assert [r[1] for r in rows] == RUNS
    assert all(float(r[2]) > 0 for r in rows)


def test_bad_counts_are_refused_by_name():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dit.py"), "--steps", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "--steps must be 1 or more, got 0" in done.stderr
