"""Inversion: DDIMInvert against sampling the same steps (KSampler, ddim sampler,
ddim_uniform), one image at cfg 1, with the UNet calls per step of each.

    python benchmarks/inversion_speed.py                 # GPU: SDXL 1024² fp16; CPU: SD1.5 512² fp32
    python benchmarks/inversion_speed.py --model sd15 --steps 50
    python benchmarks/inversion_speed.py --unet narrow --size 64 --steps 2  # smoke run

Target ≤ 1.05× the sampling time, one UNet call per step at cfg 1.
"""

from __future__ import annotations

import sys

import _common

GPU_STEPS, CPU_STEPS, CFG = 50, 2, 1.0
MIN_STEPS = 2  # DDIMInvert's minimum


def measure(s: _common.Setup) -> list[dict]:
    import nodes

    inversion = s.host.module("nodes.inversion")
    counted = s.model.clone()
    counter = _common.RowCounter()
    counted.set_model_unet_function_wrapper(counter)
    positive, _ = s.conditioning()
    latent = {"samples": s.noise(1, seed=3)}
    scheduler = "ddim_uniform"

    def sample(steps):
        nodes.KSampler().sample(counted, 0, steps, 1.0, "ddim", scheduler, positive, positive, latent)

    def invert(steps):
        _common.run_node(inversion.DDIMInvert, model=counted, latent=latent, positive=positive, cfg=1.0, steps=steps,
                         scheduler=scheduler, method="ddim")

    steps = s.args.steps
    calls = {}
    for label, run in (("KSampler (ddim)", sample), ("DDIMInvert", invert)):
        counter.clear()
        run(steps)
        calls[label] = f"{len(counter.rows) / steps:g} UNet call(s)/step"
    measured = _common.compare({"KSampler (ddim)": sample, "DDIMInvert": invert}, s, steps,
                               warmup_steps=2)
    return _common.rows("DDIMInvert", measured, "KSampler (ddim)", target={"DDIMInvert": "≤ 1.05, 1 call/step"},
                        notes={label: f"cfg 1, {steps} steps; {note}" for label, note in calls.items()})


if __name__ == "__main__":
    _common.main(sys.modules[__name__])
