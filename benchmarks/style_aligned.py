"""Time and peak memory of SharedAttentionStyleAlign against the same batch unpatched.

    python benchmarks/style_aligned.py            # GPU if there is one, else CPU at a small size
    python benchmarks/style_aligned.py --size 512 --steps 10

SDXL architecture (random weights: timing does not depend on the values), a batch
of 4 images, CFG 5, euler, through ComfyUI's own `comfy.sample.sample`.
GPU default: the full SDXL UNet (2.6 B parameters), fp16, 1024², 20 steps (the
issue's setting). CPU default: the pack's narrow SDXL-structured test UNet (same
70 attention layers, 1/10 the width) in fp32 at 256², 4 steps: a full SDXL needs
10 GB in fp32 and hours per image on a CPU. Prints the device, the config and one table.
"""

from __future__ import annotations

import statistics

import _common


def main():
    args = _common.sdxl_arguments(__doc__.split("\n")[0], steps=(20, 4), cfg=5.0, batch=True)
    host = _common.load_host()
    import torch

    tiny = _common.pack_module(host, "nodes.tiny_models")
    StyleAlignedSettings = _common.pack_module(host, "attention_patches.style_aligned").StyleAlignedSettings
    apply_style_aligned = _common.pack_module(host, "nodes.style_aligned").apply_style_aligned

    full = args.model == "full"
    model = _common.sdxl_model(tiny, _common.torch_dtype(args.dtype), full)
    patched = apply_style_aligned(model, StyleAlignedSettings(), share_group_norm=False, reference_control=False)
    latent = args.size // 8
    noise = torch.randn(args.batch, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    positive, negative = _common.sdxl_conditioning(tiny, args.batch, full)
    _common.describe_sdxl_run(args, full, args.batch)

    results = {}
    for label, m in (("unpatched", model), ("StyleAligned", patched)):
        _common.sample_timed(m, noise, min(args.steps, 2), args.cfg, positive, negative)  # warm-up: load, kernels
        runs = [_common.sample_timed(m, noise, args.steps, args.cfg, positive, negative) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        peaks = [r[1] for r in runs if r[1] is not None]
        results[label] = (seconds, max(peaks) if peaks else None)

    base_s, base_peak = results["unpatched"]
    print()
    print("| variant | ms/step | time ratio | peak memory | memory ratio |")
    print("|---|---|---|---|---|")
    for label, (seconds, peak) in results.items():
        per_step = 1000 * seconds / args.steps
        memory = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (CPU)"
        memory_ratio = f"{peak / base_peak:.3f}x" if peak is not None else "n/a"
        print(f"| {label} | {per_step:.1f} | {seconds / base_s:.3f}x | {memory} | {memory_ratio} |")


if __name__ == "__main__":
    main()
