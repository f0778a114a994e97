"""PlugAndPlay: one translation of an inverted image against one plain generation of the same size and steps.

    python benchmarks/plug_and_play.py                   # GPU: SDXL 1024² fp16; CPU: SD1.5 512² fp32
    python benchmarks/plug_and_play.py --model sd15 --size 512 --steps 2
    python benchmarks/plug_and_play.py --unet narrow --size 64 --steps 1   # smoke run

CFG 7.5, DDIM (= euler), the authors' injection windows (τ_f 0.8, τ_A 0.5). The baseline is
KSampler over the same schedule (ddim_uniform); the translation samples the same steps with the
guidance branch's rows in the batch (its latent read from the inversion). The inversion is made
once, outside the timing (DDIMInvert's cost is benchmarks/inversion_speed.py's). The
conditioning is random of the model's widths (speed does not depend on the values). Target on
SDXL 1024² fp16: ≤ 1.3× the plain generation (the issue's; the batch holds 2 rows per CFG half
against 1, so about 2× is expected where the UNet is compute-bound).
"""

from __future__ import annotations

import sys

import _common

GPU_STEPS, CPU_STEPS, CFG = 50, 2, 7.5
MIN_STEPS = 2


def measure(s: _common.Setup) -> list[dict]:
    import nodes

    inversion = s.host.module("nodes.inversion")
    pnp = s.host.module("nodes.plug_and_play")
    steps = max(s.args.steps, MIN_STEPS)
    counted = s.model.clone()
    counter = _common.RowCounter()
    counted.set_model_unet_function_wrapper(counter)
    positive, negative = s.conditioning(2)  # rows: the guidance branch, the translation
    one = lambda c: [[c[0][0][:1], {k: (v[:1] if k == "pooled_output" else v) for k, v in c[0][1].items()}]]  # noqa: E731
    guidance, plain_negative = one(positive), one(negative)
    latent = {"samples": s.noise(1)}

    def invert(n):
        return _common.run_node(inversion.DDIMInvert, model=s.model, latent=latent, positive=guidance, steps=n,
                                method="ddim")[1]

    inverted = {steps: invert(steps), MIN_STEPS: invert(MIN_STEPS)}

    def generate(n):
        counter.clear()
        nodes.KSampler().sample(counted, 0, n, s.args.cfg, "ddim", "ddim_uniform", guidance, plain_negative, latent)

    def translate(n):
        counter.clear()
        pnp.translate_conditioned(counted, inverted[n], positive, negative, 2, s.args.cfg, n, 0.8, 0.5)

    measured = _common.compare({"one generation": generate, "PlugAndPlay translation": translate}, s, steps,
                               warmup_steps=MIN_STEPS)
    notes = {"PlugAndPlay translation": f"{len(counter.rows)} UNet calls ({sum(counter.rows)} rows) for {steps} "
                                        "steps; inversion untimed"}
    return _common.rows("PlugAndPlay", measured, "one generation", target={"PlugAndPlay translation": "≤ 1.3"},
                        notes=notes)


if __name__ == "__main__":
    _common.main(sys.modules[__name__])
