"""benchmarks/quality.py: the two-object outcome rules, and a whole (--quick) run on the demo
model that prints one row per figure the issue asks for, every section present."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def test_first_component_auc_scores_the_side_the_component_lights():
    # 64 tokens, 10 of them an "object" that attends to itself; the rest attend to the background
    g = torch.Generator().manual_seed(0)
    inside = torch.zeros(64, dtype=torch.bool)
    inside[[18, 19, 20, 26, 27, 28, 34, 35, 36, 44]] = True
    rows = torch.where(inside[:, None] == inside[None, :], 3.0, 1.0) + 0.1 * torch.rand(64, 64, generator=g)
    rows = rows / rows.sum(-1, keepdim=True)
    mask = inside.reshape(8, 8).repeat_interleave(4, 0).repeat_interleave(4, 1).numpy()
    assert quality.first_component_auc(rows, (8, 8), mask) > 0.95
    assert quality.first_component_auc(rows, (8, 8), ~mask) < 0.05
    with pytest.raises(ValueError, match="both object and background"):
        quality.first_component_auc(rows, (8, 8), np.ones((32, 32), bool))


def test_quick_run_reports_every_section(host, tmp_path):
    """The quick run: one table's rows, each section the issue names, figures in range."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    rows = result["rows"]
    sections = {row["section"] for row in rows}
    p2p = {s for s in sections if s.startswith("Prompt-to-Prompt")}
    assert p2p == {"Prompt-to-Prompt (defaults)", "Prompt-to-Prompt (local blend)",
                   "Prompt-to-Prompt (cross 0.2 + local blend)", "Prompt-to-Prompt baseline: prompt switch at 40%",
                   "Prompt-to-Prompt, real (defaults)", "Prompt-to-Prompt, real (cross 0)"}, p2p
    pnp = {s for s in sections if s.startswith(("Plug-and-Play", "SDEdit"))}
    assert pnp == {"Plug-and-Play, real (cfg 7.5, the authors' negative)", "Plug-and-Play, real (cfg 5, empty negative)",
                   "SDEdit 0.6 (cfg 5)", "SDEdit 0.75 (cfg 5)", "SDEdit 0.9 (cfg 5)"}, pnp
    assert all(row["baseline"] is not None for row in rows if row["section"].startswith("Plug-and-Play"))
    assert sections - p2p - pnp == {"model", "StyleAligned", "StyleAligned from a photo", "Bounded Attention", "SelfAttnSegment",
                              "DDIM inversion", "Cross-Image Attention"}
    for row in rows:
        if row["value"] is not None and "PSNR" not in row["metric"]:
            assert 0 <= row["value"] <= 1, row
    psnr = [row for row in rows if "PSNR" in row["metric"]]
    assert psnr and all(row["value"] > 15 for row in psnr), psnr
    inversion = {row["metric"]: row for row in rows if row["section"] == "DDIM inversion"}
    assert any("DDIM inversion round trip" in m and row["baseline"] for m, row in inversion.items()), inversion
    # the DDPM replay with its noise maps and final residual is exact: it lands on the VAE's own reconstruction
    exact = [row for m, row in inversion.items() if "DDPM inversion replay, exact" in m]
    assert exact and abs(exact[0]["value"] - exact[0]["baseline"]) < 0.1, inversion
    assert any("without the final residual" in m for m in inversion), inversion
    segment = [row["metric"] for row in rows if row["section"] == "SelfAttnSegment"]
    assert sum("label ignored" in m for m in segment) == 2 and len(segment) == 10, segment
    assert sum(m.startswith("ceiling:") for m in segment) == 2, segment
    assert sum("labelled with its noun" in m for m in segment) == 2 and sum("first component AUC" in m for m in segment) == 2
