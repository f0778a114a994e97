"""benchmarks/quality.py: the two-object outcome rules, and a whole (--quick) run on the demo
model that prints one row per figure the issue asks for, every section present."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # noqa: E402

SUBJECTS = [("red", "circle"), ("blue", "square")]


@pytest.mark.parametrize("found, outcome", [
    ([("red", "circle"), ("blue", "square")], "correct"),
    ([("blue", "square"), ("red", "circle"), ("green", "star")], "correct"),
    ([("red", "circle")], "neglect"),
    ([("red", "circle"), ("green", "square")], "neglect"),  # a square, but not of a prompted colour
    ([("red", "square")], "fusion"),  # one object: the first's colour, the second's shape
    ([("red", "square"), ("blue", "circle")], "binding"),  # the attributes swapped
    ([("red", "star"), ("blue", "triangle")], "other"),  # both colours, shapes nobody asked for
])
def test_two_object_outcome(found, outcome):
    assert quality.two_object_outcome(found, SUBJECTS) == outcome


def test_quick_run_reports_every_section(host, tmp_path):
    """The quick run: one table's rows, each section the issue names, figures in range."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    rows = result["rows"]
    sections = {row["section"] for row in rows}
    assert sections == {"model", "StyleAligned", "StyleAligned from a photo", "Bounded Attention", "SelfAttnSegment", "DDIM inversion",
                        "Cross-Image Attention"}
    for row in rows:
        if row["value"] is not None and "PSNR" not in row["metric"]:
            assert 0 <= row["value"] <= 1, row
    psnr = [row for row in rows if "PSNR" in row["metric"]]
    assert psnr and all(row["value"] > 15 for row in psnr), psnr
    segment = [row["metric"] for row in rows if row["section"] == "SelfAttnSegment"]
    assert sum("label ignored" in m for m in segment) == 2 and len(segment) == 4, segment
