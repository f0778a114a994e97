"""BoundedAttentionLayout: masks only and with guidance (its own loss, Layout Guidance's
and Attend-and-Excite's) against the same graph unpatched.

    python benchmarks/bounded.py                         # GPU: SDXL 1024² fp16, 50 steps; CPU: SD1.5 512² fp32
    python benchmarks/bounded.py --model sdxl --size 512 --steps 4
    python benchmarks/bounded.py --unet narrow --size 64 --steps 2       # smoke run

One image, CFG 7.5, euler; the node built as the UI builds it (run_sd.py's two subjects
and boxes, the authors' defaults otherwise). Guidance runs on the paper's share of the
steps (15 of 50, here round(0.3 × steps), at least 1) with up to 5 gradient iterations
each; how many run depends on when the loss falls under 0.2, which random weights rarely
reach, so these are near the worst case. "UNet calls" counts every UNet evaluation of
the last run, guidance passes included. Targets on SDXL 1024² fp16: ≤ 1.2× masks only,
≤ 3× with guidance.
"""

from __future__ import annotations

import sys

import _common

GPU_STEPS, CPU_STEPS, CFG = 50, 2, 7.5

PROMPT = "a ginger kitten and a gray puppy in a yard"
SUBJECTS = "ginger kitten\ngray puppy"
BOXES = "[[0.05, 0.2, 0.45, 0.8], [0.55, 0.2, 0.95, 0.8]]"
VARIANTS = {  # label: (guidance, refine_masks)
    "masks only, boxes": ("off", False),
    "masks only, refined": ("off", True),
    "bounded guidance": ("bounded", True),
    "Layout Guidance loss": ("layout_guidance", True),
    "Attend-and-Excite loss": ("attend_and_excite", True),
}
TARGETS = {"masks only, boxes": "≤ 1.2", "masks only, refined": "≤ 1.2", "bounded guidance": "≤ 3",
           "Layout Guidance loss": "≤ 3", "Attend-and-Excite loss": "≤ 3"}


def measure(s: _common.Setup) -> list[dict]:
    bounded = s.host.module("nodes.bounded")
    steps, cfg = s.args.steps, s.args.cfg
    guided_steps = max(1, round(0.3 * steps))
    positive, negative = s.conditioning()
    noise = s.noise()
    clip = s.clip()  # its tokenizer finds the subjects' tokens

    counters, variants = {}, {}
    for label, (guidance, refine) in {"unpatched": (None, None), **VARIANTS}.items():
        counted = s.model.clone()
        counters[label] = _common.RowCounter()
        counted.set_model_unet_function_wrapper(counters[label])
        if guidance is not None:
            counted = _common.run_node(bounded.BoundedAttentionLayout, model=counted, clip=clip, prompt=PROMPT,
                                       subjects=SUBJECTS, boxes=BOXES, width=s.args.size, height=s.args.size,
                                       guidance=guidance, guidance_steps=guided_steps, refine_masks=refine)[0]

        def run(n, model=counted, counter=counters[label]):
            counter.clear()
            _common.sample(model, noise, n, cfg, positive, negative)
        variants[label] = run

    measured = _common.compare(variants, s)
    notes = {label: f"{len(c.rows)} UNet calls ({sum(c.rows)} rows)" for label, c in counters.items()}
    for label, (guidance, _) in VARIANTS.items():
        if guidance != "off":
            notes[label] += f"; guided steps {guided_steps} of {steps}"
    return _common.rows("BoundedAttentionLayout", measured, "unpatched", target=TARGETS, notes=notes)


if __name__ == "__main__":
    _common.main(sys.modules[__name__])
