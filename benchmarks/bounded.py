"""Time and peak memory of BoundedAttentionLayout (masks only, and with guidance) against unpatched sampling.

    python benchmarks/bounded.py                      # GPU if there is one, else CPU at a small size
    python benchmarks/bounded.py --size 512 --steps 30

SDXL architecture with random weights (no checkpoint is needed: the cost does
not depend on the values, but the guidance's early stop does, see below), one
image, CFG 7.5, euler, through ComfyUI's own `comfy.sample.sample`, the node
built by `nodes/bounded.py` exactly as the UI builds it (two subjects of
run_sd.py's prompt and boxes, the authors' defaults otherwise).
GPU default: the full SDXL UNet (2.6 B parameters), fp16, 1024², 50 steps (the
paper's). CPU default: the pack's narrow SDXL-structured test UNet (same 70
attention layers, 1/10 the width) in fp32 at 256², 20 steps.

Variants: unpatched; masks only (guidance off) without and with mask refinement
(refinement starts at step 15, so it needs more than 15 steps); guidance on
(bounded loss, 15 guided steps of up to 5 gradient iterations, plus masks and
refinement). The guidance's cost depends on how many iterations run before the
loss falls under 0.2; random weights rarely get there, so the table shows the
mean iterations per guided step (5 = the worst case). The issue's targets:
≤ 1.2× with masks only, ≤ 3× with guidance on.
"""

from __future__ import annotations

import statistics

import _common

PROMPT = "a ginger kitten and a gray puppy in a yard"
SUBJECTS = "ginger kitten\ngray puppy"
BOXES = "[[0.05, 0.2, 0.45, 0.8], [0.55, 0.2, 0.95, 0.8]]"
VARIANTS = {  # label: (guidance, refine_masks)
    "masks only, boxes": ("off", False),
    "masks only, refined": ("off", True),
    "guidance on": ("bounded", True),
}


def bounded_model(bounded, model, clip, size, guidance, refine_masks):
    return bounded._apply(model, clip, prompt=PROMPT, subjects=SUBJECTS, boxes=BOXES, width=size, height=size,
                  guidance=guidance, guidance_steps=15, iterations_per_step=5, step_size_start=0.0,
                  step_size_end=0.0, loss_threshold=0.2, cross_loss_scale=1.5, self_loss_scale=0.5,
                  mask_eos=True, filter_words=True, refine_masks=refine_masks)


def main():
    args = _common.sdxl_arguments(__doc__.split("\n")[0], steps=(50, 20), cfg=7.5)
    host = _common.load_host()
    import torch

    tiny, bounded = _common.pack_module(host, "nodes.tiny_models"), _common.pack_module(host, "nodes.bounded")
    full = args.model == "full"
    model = _common.sdxl_model(tiny, _common.torch_dtype(args.dtype), full)
    clip = tiny.text_encoder()  # only its tokenizer is used: the standard CLIP one
    latent = args.size // 8
    noise = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    positive, negative = _common.sdxl_conditioning(tiny, 1, full)
    _common.describe_sdxl_run(args, full)

    models = {"unpatched": model}
    models.update({label: bounded_model(bounded, model, clip, args.size, *v) for label, v in VARIANTS.items()})
    results = {}
    for label, m in models.items():
        _common.sample_timed(m, noise, min(args.steps, 2), args.cfg, positive, negative)  # warm-up: load, kernels
        runs = [_common.sample_timed(m, noise, args.steps, args.cfg, positive, negative) for _ in range(args.repeats)]
        peaks = [r[1] for r in runs if r[1] is not None]
        wrappers = m.get_wrappers("calc_cond_batch", bounded.WRAPPER_KEY) if m is not model else []
        iterations = [len(losses) for _, losses in wrappers[0].losses] if wrappers else []
        results[label] = (statistics.median(r[0] for r in runs), max(peaks) if peaks else None,
                          f"{statistics.mean(iterations):.1f}" if iterations else "-")

    base_s, base_peak = results["unpatched"][:2]
    print()
    print("| variant | ms/step | time ratio | peak memory | memory ratio | iterations/guided step |")
    print("|---|---|---|---|---|---|")
    for label, (seconds, peak, iterations) in results.items():
        memory = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (CPU)"
        memory_ratio = f"{peak / base_peak:.3f}x" if peak is not None else "n/a"
        print(f"| {label} | {1000 * seconds / args.steps:.1f} | {seconds / base_s:.3f}x | {memory} | "
              f"{memory_ratio} | {iterations} |")


if __name__ == "__main__":
    main()
