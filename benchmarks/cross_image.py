"""CrossImageAttention: one appearance transfer against one unpatched generation of the
same size and steps.

    python benchmarks/cross_image.py                     # GPU: SD1.5 512² fp16, 100 steps; CPU: SD1.5 512² fp32
    python benchmarks/cross_image.py --steps 20
    python benchmarks/cross_image.py --unet narrow --size 64 --steps 2   # smoke run

SD1.5 only (the authors' model; the node's CLIP prompts are SD1.5's). The baseline is
KSampler (euler_ancestral, cfg 1, as the transfer's text CFG is off) over the
inversion's whole schedule (`--steps`, authors: 100); the transfer denoises the schedule
after its skipped steps (authors: skip 32 of 100, denoise 68) with the node's defaults (the authors').
The two inversions are made once, outside the timing (DDIMInvert's cost is
benchmarks/inversion_speed.py's). Target ≤ 2.5× (the authors' pipeline: about 5×).
"""

from __future__ import annotations

import math
import sys

import _common

GPU_STEPS, CPU_STEPS, CFG = 100, 4, 1.0
MIN_STEPS = 2  # one step skipped, one denoised
FAMILIES = ("sd15",)  # the authors' model; the node encodes SD1.5 prompts


def measure(s: _common.Setup) -> list[dict]:
    import nodes

    inversion = s.host.module("nodes.inversion")
    cross_image = s.host.module("nodes.cross_image")
    steps = s.args.steps
    clip = s.clip()
    counted = s.model.clone()
    counter = _common.RowCounter()
    counted.set_model_unet_function_wrapper(counter)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("A photo of a cat"))
    structure_latent = {"samples": s.noise(1, seed=1)}
    appearance_latent = {"samples": s.noise(1, seed=2)}

    def invert(latent):
        return _common.run_node(inversion.DDIMInvert, model=s.model, latent=latent, positive=positive, steps=steps,
                                method="ddpm")[1]

    structure, appearance = invert(structure_latent), invert(appearance_latent)
    warm_structure, warm_appearance = (_common.run_node(inversion.DDIMInvert, model=s.model, latent=latent,
                                                        positive=positive, steps=MIN_STEPS, method="ddpm")[1]
                                       for latent in (structure_latent, appearance_latent))

    def generate(n):
        counter.clear()
        nodes.KSampler().sample(counted, 0, n, 1.0, "euler_ancestral", "ddim_uniform", positive, positive,
                                structure_latent)

    def transfer(n):
        counter.clear()
        pair = (structure, appearance) if n == steps else (warm_structure, warm_appearance)
        _common.run_node(cross_image.CrossImageAttention, model=counted, clip=clip, structure=pair[0],
                         appearance=pair[1], structure_object="cat", appearance_object="cat")

    measured = _common.compare({"one generation": generate, "CrossImageAttention transfer": transfer}, s, steps,
                               warmup_steps=MIN_STEPS)
    notes = {"one generation": f"{steps} steps, cfg 1"}  # the counter holds the last run's: the transfer's
    skip = _common.node_defaults(cross_image.CrossImageAttention)["skip"]
    denoised = steps - math.floor(skip * steps + 0.5)
    notes["CrossImageAttention transfer"] = (f"{len(counter.rows)} UNet calls ({sum(counter.rows)} rows) for "
                                             f"{denoised} denoised of {steps} steps; inversions untimed")
    return _common.rows("CrossImageAttention", measured, "one generation",
                        target={"CrossImageAttention transfer": "≤ 2.5"}, notes=notes)


if __name__ == "__main__":
    _common.main(sys.modules[__name__])
