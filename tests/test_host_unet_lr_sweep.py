"""benchmarks/unet_lr_sweep.py: the learning-rate comparison behind train.py's unet_lr, run tiny."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "unet_lr_sweep.py"


def _sweep(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=REPO)


def test_each_rate_trains_from_the_same_weights_and_is_scored_on_held_out_scenes(host):
    done = _sweep("--lr", "1e-3", "1e-1", "--iters", "3", "--scenes", "48", "--held-out", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^lr (\S+): weighted ε-loss ([\d.]+)  plain ([\d.]+)  plain at t < 400 ([\d.]+)$",
                      done.stdout, re.M)
    assert [lr for lr, *_ in rows] == ["0.001", "0.1"]
    losses = [[float(v) for v in row[1:]] for row in rows]
    assert all(0 < v < 10 for row in losses for v in row)
    assert losses[0] != losses[1]  # the rate reached the optimiser: same weights, data and noise otherwise


def test_held_out_must_leave_scenes_to_train_on(host):
    done = _sweep("--scenes", "10", "--held-out", "10")
    assert done.returncode != 0 and "--held-out must be between 1 and --scenes - 1 (9), got 10" in done.stderr


def test_fidelity_prompts_sample_each_rate_and_score_colour_and_shape(host):
    done = _sweep("--lr", "1e-3", "--iters", "2", "--scenes", "24", "--held-out", "4", "--ema", "0.5",
                  "--fidelity-prompts", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    scores = re.findall(r"^lr 0\.001: single-object fidelity over 2 prompts: colour (\d+)%  shape (\d+)%  both (\d+)%$",
                        done.stdout, re.M)
    assert len(scores) == 1, done.stdout[-2000:]
    colour, shape, both = (int(v) for v in scores[0])
    # two prompts: each share is 0, 50 or 100, and both right cannot exceed either alone
    assert {colour, shape, both} <= {0, 50, 100} and both <= min(colour, shape)


def test_bad_ema_and_prompt_counts_are_refused_by_name(host):
    done = _sweep("--ema", "1")
    assert done.returncode != 0 and "--ema must be in [0, 1), got 1.0" in done.stderr
    done = _sweep("--fidelity-prompts", "-1")
    assert done.returncode != 0 and "--fidelity-prompts must be 0 or more, got -1" in done.stderr
