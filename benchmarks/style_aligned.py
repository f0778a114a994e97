"""StyleAligned: time and peak memory of a batch of 4 with SharedAttentionStyleAlign, and
of the same batch taking its style from a photo (StyleAlignedReferenceFromInversion),
against the same batch unpatched.

    python benchmarks/style_aligned.py                   # GPU: SDXL 1024² fp16; CPU: SD1.5 512² fp32
    python benchmarks/style_aligned.py --model sdxl --size 512 --steps 2
    python benchmarks/style_aligned.py --unet narrow --size 64 --steps 1   # smoke run

Batch 4, CFG 5, euler; the nodes' defaults (the paper's). The photo's DDIM inversion is
made once, outside the timing (its cost is benchmarks/inversion_speed.py's). Targets on
SDXL 1024² fp16: ≤ 1.20× time and ≤ 1.05× peak memory.
"""

from __future__ import annotations

import sys

import _common

GPU_STEPS, CPU_STEPS, CFG = 20, 2, 5.0

BATCH = 4


def measure(s: _common.Setup) -> list[dict]:
    nodes = s.host.module("nodes.style_aligned")
    inversion = s.host.module("nodes.inversion")
    steps, cfg = s.args.steps, s.args.cfg

    styled = _common.run_node(nodes.SharedAttentionStyleAlign, model=s.model)[0]
    positive, negative = s.conditioning(BATCH)
    noise = s.noise(BATCH)

    photo_positive, _ = s.conditioning(1, seed=5)
    photo = {"samples": s.noise(1, seed=7)}
    photo_inversion = _common.run_node(inversion.DDIMInvert, model=s.model, latent=photo, positive=photo_positive,
                                       steps=max(steps, 2), scheduler="normal")[1]
    offset = min(_common.node_defaults(nodes.StyleAlignedReferenceFromInversion)["offset"], max(steps, 2) - 1)
    from_photo = _common.run_node(nodes.StyleAlignedReferenceFromInversion, model=styled, inversion=photo_inversion,
                                  reference_positive=photo_positive, offset=offset)[0]

    run = lambda model: lambda n: _common.sample(model, noise, n, cfg, positive, negative)  # noqa: E731
    measured = _common.compare({"unpatched": run(s.model), "StyleAligned": run(styled),
                                "StyleAligned from a photo": run(from_photo)}, s)
    return _common.rows("StyleAligned", measured, "unpatched",
                        target={"StyleAligned": "≤ 1.20 time, ≤ 1.05 memory"},
                        notes={"unpatched": f"batch {BATCH}",
                               "StyleAligned from a photo": f"inversion made once, untimed; offset {offset}"})


if __name__ == "__main__":
    _common.main(sys.modules[__name__])
