"""Every speed benchmark script runs, at its smallest size, and prints its table.

All scripts run in one subprocess (one ComfyUI start-up, not one per script), each
through its own `__main__` and command line, on the narrow test UNets, 64² images,
the fewest steps each accepts; then benchmarks/all.py writes the whole table. A
renamed node input or pack function breaks this test, not a GPU day.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import headless
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SMALLEST = ["--unet", "narrow", "--size", "64", "--steps", "1", "--repeats", "1", "--cpu"]
# script: the techniques its table must hold, each with its runs
EXPECTED = {
    "router_overhead.py": {"router": ["unpatched", "router, pass-through technique"]},
    "style_aligned.py": {"StyleAligned": ["unpatched", "StyleAligned", "StyleAligned from a photo"]},
    "inversion_speed.py": {"DDIMInvert": ["KSampler (ddim)", "DDIMInvert"]},
    "recording.py": {"attention recording": ["unpatched", "AttentionRecorder"],
                     "SelfAttnSegment": ["generation + RecordAttentionPass + SelfAttnSegment"]},
    "bounded.py": {"BoundedAttentionLayout": ["unpatched", "masks only, boxes", "masks only, refined",
                                              "bounded guidance", "Layout Guidance loss", "Attend-and-Excite loss"]},
    "cross_image.py": {"CrossImageAttention": ["one generation", "CrossImageAttention transfer"]},
    "prompt_to_prompt.py": {"Prompt-to-Prompt": ["one generation", "Prompt-to-Prompt edit"]},
    "plug_and_play.py": {"PlugAndPlay": ["one generation", "PlugAndPlay translation"]},
}
# benchmarks with their own tests (they measure quality or training, not speed)
TESTED_ELSEWHERE = {"quality.py": "test_host_quality_benchmark.py", "unet_lr_sweep.py": "test_host_unet_lr_sweep.py",
                    "dit.py": "test_host_dit_benchmark.py"}

DRIVER = """
import json, runpy, sys, traceback
sys.path.insert(0, {benchmarks!r})
for script, argv in json.loads(sys.argv[1]):
    print("=== " + script, flush=True)
    sys.argv = [script] + argv
    try:
        runpy.run_path({benchmarks!r} + "/" + script, run_name="__main__")
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print("=== failed", flush=True)
"""


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| technique")
            and not line.startswith("| setting")]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root, how = headless.find_comfyui()
    if root is None:
        pytest.skip(how)
    table = tmp_path_factory.mktemp("bench") / "all.md"
    runs = [[script, SMALLEST] for script in EXPECTED] + [["all.py", SMALLEST + ["--out", str(table)]]]
    done = subprocess.run([sys.executable, "-c", DRIVER.format(benchmarks=str(BENCHMARKS)), json.dumps(runs)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    sections = dict(re.findall(r"^=== (\S+)\n(.*?)(?=^=== |\Z)", done.stdout, re.M | re.S))
    return sections, table


def test_every_speed_script_is_smoke_run_or_tested_elsewhere():
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED) | {"all.py"} | set(TESTED_ELSEWHERE)
    for script, test in TESTED_ELSEWHERE.items():
        assert script in (REPO / "tests" / test).read_text()


def test_benchmarks_call_only_public_names():
    """No `module._private` reach-ins (a script's own `self._helper` aside): a benchmark uses what users' graphs use."""
    for path in sorted(BENCHMARKS.glob("*.py")):
        tree = ast.parse(path.read_text())
        private = [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                   and node.attr.startswith("_") and not node.attr.startswith("__")
                   and not (isinstance(node.value, ast.Name) and node.value.id == "self")]
        assert not private, f"{path.name} reaches into {private}"


@pytest.mark.parametrize("script", list(EXPECTED))
def test_script_prints_its_setting_and_one_table_of_every_run(outputs, script):
    sections, _ = outputs
    text = sections[script]
    assert "=== failed" not in text and "Traceback" not in text, text[-3000:]
    assert re.search(r"^device: CPU .*model: narrow test sd15 UNet.*image 64x64.*fp32; \d+ steps, cfg [\d.]+",
                     text, re.M), text[:1000]
    rows = table_rows(text)
    expected = [(technique, run) for technique, runs in EXPECTED[script].items() for run in runs]
    assert [(r[0], r[1]) for r in rows] == expected
    for row in rows:
        seconds, ratio, memory = float(row[2]), row[3], row[4]
        assert seconds > 0
        assert ratio == "1 (baseline)" or float(ratio) > 0
        assert memory == "not measured (CPU)"


def test_all_writes_the_whole_table_as_markdown(outputs):
    sections, table = outputs
    text = sections["all.py"]
    assert "Traceback" not in text, text[-3000:]
    written = table.read_text()
    assert written in text  # printed and written alike
    rows = table_rows(written)
    expected = [(technique, run) for runs in EXPECTED.values() for technique, names in runs.items() for run in names]
    assert [(r[1], r[2]) for r in rows] == expected
    assert all(r[0].startswith("narrow test sd15 UNet, 64², fp32,") for r in rows)
    assert re.search(r"command: `python benchmarks/all.py --unet narrow", written)


@pytest.mark.parametrize("arguments, message", [
    (["--size", "100"], "--size must be a multiple of 64 (the latent is size/8 and the UNet halves it 3 times), got 100"),
    (["--steps", "0"], "--steps must be 1 or more, got 0"),
    (["--repeats", "0"], "--repeats must be 1 or more, got 0"),
])
def test_bad_sizes_and_counts_are_refused_by_name_before_any_model_is_built(arguments, message):
    for script in ("router_overhead.py", "all.py"):
        done = subprocess.run([sys.executable, str(BENCHMARKS / script), *arguments], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
