"""Prompt-to-Prompt: one edit (the source and one edited prompt, sampled together) against one plain
generation of the same size and steps.

    python benchmarks/prompt_to_prompt.py                   # GPU: SDXL 1024² fp16; CPU: SD1.5 512² fp32
    python benchmarks/prompt_to_prompt.py --model sdxl --size 512 --steps 2
    python benchmarks/prompt_to_prompt.py --unet narrow --size 64 --steps 1   # smoke run

CFG 7.5, euler, through ComfyUI's CFGGuider for the plain generation and PromptToPromptEdit's
guider for the edit, with the authors' defaults and local blend on the swapped word (so the
blend maps are aggregated too). The prompts' token alignment uses a CLIP with the standard
tokenizer; the conditioning itself is random of the model's widths (speed does not depend on
the values). Target on SDXL 1024² fp16: ≤ 2.1× the plain generation (the edit is two images).
"""

from __future__ import annotations

import sys

import _common

GPU_STEPS, CPU_STEPS, CFG = 50, 2, 7.5

SOURCE = "a photo of a cat riding a bike"
EDIT = "a photo of a dog riding a bike"


def measure(s: _common.Setup) -> list[dict]:
    import comfy.samplers

    p2p = s.host.module("nodes.prompt_to_prompt")
    patching = s.host.module("nodes.patching")
    positive, negative = s.conditioning(2)  # rows: the source, the edit
    cond, extra = positive[0]
    one = lambda c: [[c[0][0][:1], {k: (v[:1] if k == "pooled_output" else v) for k, v in c[0][1].items()}]]  # noqa: E731
    source_only, negative = one(positive), one(negative)
    noise = s.noise(1)
    sampler = comfy.samplers.sampler_object("euler")

    def guided(make_guider):
        def run(steps):
            sigmas = comfy.samplers.calculate_sigmas(s.model.get_model_object("model_sampling"), "normal", steps)
            guider = make_guider()
            guider.set_cfg(s.args.cfg)
            return guider.sample(noise, noise * 0, sampler, sigmas, disable_pbar=True, seed=0)
        return run

    def plain():
        guider = comfy.samplers.CFGGuider(s.model)
        guider.set_conds(source_only, negative)
        return guider

    def edit():
        technique = p2p.build_technique(s.clip(), SOURCE, [EDIT], blend_words="cat, dog")
        patched = s.model.clone()
        patching.attach_router(patched).add(technique)
        guider = p2p.PromptToPromptGuider(patched, technique)
        guider.set_conds(positive, negative)
        return guider

    measured = _common.compare({"one generation": guided(plain), "Prompt-to-Prompt edit": guided(edit)}, s)
    return _common.rows("Prompt-to-Prompt", measured, "one generation",
                        target={"Prompt-to-Prompt edit": "≤ 2.1 time"},
                        notes={"Prompt-to-Prompt edit": "source + 1 edit, local blend on"})


if __name__ == "__main__":
    _common.main(sys.modules[__name__])
