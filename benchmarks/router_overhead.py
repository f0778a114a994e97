"""Cost of the attention router itself: sampling with the router on (a pass-through
technique on every attention layer) against the same graph unpatched.

    python benchmarks/router_overhead.py                 # GPU: SDXL 1024² fp16; CPU: SD1.5 512² fp32
    python benchmarks/router_overhead.py --model sdxl --size 512 --steps 2
    python benchmarks/router_overhead.py --unet narrow --size 64 --steps 1   # smoke run

One image, CFG 5, euler. Target ≈ 1.00×: the router adds Python dispatch per layer,
no tensor work.
"""

from __future__ import annotations

import sys

import _common

GPU_STEPS, CPU_STEPS, CFG = 20, 2, 5.0


def measure(s: _common.Setup) -> list[dict]:
    patching = s.host.module("nodes.patching")
    AttentionTechnique = s.host.module("attention_patches").AttentionTechnique

    routed = s.model.clone()
    patching.attach_router(routed).add(AttentionTechnique())
    positive, negative = s.conditioning()
    noise = s.noise()
    cfg = s.args.cfg

    measured = _common.compare({
        "unpatched": lambda steps: _common.sample(s.model, noise, steps, cfg, positive, negative),
        "router, pass-through technique": lambda steps: _common.sample(routed, noise, steps, cfg, positive, negative),
    }, s)
    return _common.rows("router", measured, "unpatched", target={"router, pass-through technique": "≈ 1.00"},
                        notes={"unpatched": "batch 1"})


if __name__ == "__main__":
    _common.main(sys.modules[__name__])
