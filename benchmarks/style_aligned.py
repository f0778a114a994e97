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

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import torch  # noqa: E402

import headless  # noqa: E402


def load_comfy(cpu: bool):
    root, how = headless.find_comfyui()
    if root is None:
        raise SystemExit(how)
    for p in [str(root)] + headless.host_pythonpath():
        if p not in sys.path:
            sys.path.insert(0, p)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401

    if "attention_lab" not in sys.modules:  # the pack as a package, without ComfyUI's loader
        package = types.ModuleType("attention_lab")
        package.__path__ = [str(REPO)]
        sys.modules["attention_lab"] = package
    return root


def sdxl_model(dtype, full: bool):
    import comfy.supported_models
    from attention_lab.nodes import tiny_models

    if not full:
        return tiny_models.sdxl_unet(seed=0, dtype=dtype)
    config = dict(
        tiny_models.SDXL_UNET, model_channels=320, channel_mult=[1, 2, 4], num_head_channels=64,
        context_dim=2048, adm_in_channels=2816,
    )
    return tiny_models._unet(comfy.supported_models.SDXL, config, seed=0, dtype=dtype)


def conditioning(batch, full: bool):
    from attention_lab.nodes import tiny_models

    g = torch.Generator().manual_seed(0)
    pooled, context = (1280, 2048) if full else (tiny_models.SDXL_POOLED, tiny_models.TEXT_HIDDEN)
    extra = {"pooled_output": torch.randn(batch, pooled, generator=g), "width": 1024, "height": 1024}
    cond = torch.randn(batch, 77, context, generator=g)
    negative = [[torch.zeros_like(cond), dict(extra, pooled_output=torch.zeros_like(extra["pooled_output"]))]]
    return [[cond, extra]], negative


def run(model, noise, steps, cfg, positive, negative, device):
    import comfy.sample

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, torch.zeros_like(noise),
                        seed=0, disable_pbar=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return seconds, peak


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["full", "narrow"], default="full" if cuda else "narrow",
                        help="full SDXL UNet, or the narrow SDXL-structured test UNet")
    parser.add_argument("--size", type=int, default=1024 if cuda else 256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20 if cuda else 4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3 if cuda else 1, help="timed runs per variant (median)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16" if cuda else "fp32")
    args = parser.parse_args()

    load_comfy(cpu=not cuda)
    import comfy.model_management
    from attention_lab.attention_patches.style_aligned import StyleAlignedSettings
    from attention_lab.nodes.style_aligned import apply_style_aligned

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = comfy.model_management.get_torch_device()
    full = args.model == "full"
    model = sdxl_model(dtype, full)
    patched = apply_style_aligned(model, StyleAlignedSettings(), share_group_norm=False, reference_control=False)
    latent = args.size // 8
    noise = torch.randn(args.batch, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    positive, negative = conditioning(args.batch, full)

    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {name}; torch {torch.__version__}; attention: PyTorch SDPA")
    print(f"config: {'full' if full else 'narrow (test)'} SDXL UNet, random weights, {args.dtype}, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.steps} steps, cfg {args.cfg}, euler; median of {args.repeats} run(s) after one warm-up")

    results = {}
    for label, m in (("unpatched", model), ("StyleAligned", patched)):
        run(m, noise, min(args.steps, 2), args.cfg, positive, negative, device)  # warm-up: load, kernels
        runs = [run(m, noise, args.steps, args.cfg, positive, negative, device) for _ in range(args.repeats)]
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
