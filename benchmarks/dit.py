"""Flux and SD3: the router's DiT adapter, StyleAligned and the AttentionRecorder against the unpatched model.

Full-size Flux (12 B parameters) and SD3.5 Medium (2.5 B) do not fit a CPU run, so the models are
their architectures at full width with fewer blocks (random weights: speed does not depend on the
values). Per-block costs are what matter here: the adapter adds Python dispatch per attention call,
StyleAligned a second block of keys in its blocks, so the ratios of a reduced-depth model are those
of the full one when the same share of blocks is patched.

    python benchmarks/dit.py                                   # Flux 3072 wide, 1 double + 2 single blocks
    python benchmarks/dit.py --model sd3 --blocks 2           # SD3.5 Medium's width (1536), 2 joint blocks
    OMP_NUM_THREADS=1 python benchmarks/dit.py --cpu --size 128 --text-tokens 128 --steps 1

Batch 4, euler; Flux cfg 1 with guidance 3.5 (guidance-distilled), SD3 cfg 4.5. StyleAligned with the
node's defaults (Flux: the single-stream blocks share).
"""

from __future__ import annotations

import argparse
import math
import sys
from types import SimpleNamespace

import _common

BATCH = 4


def flux_config(double: int, single: int, narrow: bool = False) -> dict:
    """Flux dev's configuration (what comfy.model_detection reads from its checkpoint), fewer blocks;
    `narrow`: 128 wide (4 heads of 32) for smoke runs."""
    width, heads, axes = (128, 4, [8, 12, 12]) if narrow else (3072, 24, [16, 56, 56])
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": width, "mlp_ratio": 4.0, "num_heads": heads, "depth": double,
            "depth_single_blocks": single, "axes_dim": axes, "theta": 10000, "qkv_bias": True,
            "guidance_embed": True}


def sd3_config(blocks: int, narrow: bool = False) -> dict:
    """SD3.5 Medium's configuration (depth 24: 1536 wide, 24 heads; image self-attention in its first 13
    blocks), `blocks` joint blocks; `narrow`: depth 2 (128 wide) for smoke runs."""
    depth = 2 if narrow else 24
    return {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "num_blocks": blocks,
            "input_size": None, "adm_in_channels": 2048, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 4096, "out_features": 64 * depth}},
            # the checkpoint's position table is 384² patches; 96² (images up to 1536 px) keeps it small
            "num_patches": 96 * 96, "pos_embed_max_size": 96, "qk_norm": "rms",
            "x_block_self_attn_layers": list(range(min(blocks, 13)))}


def build(args, dtype):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    if args.model == "flux":
        config_cls, config = comfy.supported_models.Flux, flux_config(args.double, args.single, args.narrow)
    else:
        config_cls, config = comfy.supported_models.SD3, sd3_config(args.blocks, args.narrow)
    model_config = config_cls(config)
    model_config.set_inference_dtype(dtype, None)
    device = comfy.model_management.get_torch_device()
    with torch.device(device):
        model = model_config.get_model({})
    _common.random_weights_(model.diffusion_model, seed=0)
    with torch.no_grad():
        for name, buffer in model.diffusion_model.named_buffers():
            if name.endswith("pos_embed"):
                buffer.normal_(0.0, 0.5)
    model.diffusion_model.to(device, dtype)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device,
                                               offload_device=comfy.model_management.unet_offload_device())
    return patcher, params


def conditioning(args, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    cond = torch.randn(batch, args.text_tokens, 4096, generator=g)
    pooled = torch.randn(batch, 768 if args.model == "flux" else 2048, generator=g)
    extra = {"pooled_output": pooled}
    if args.model == "flux":
        extra["guidance"] = 3.5
    return [[cond, extra]], [[torch.zeros_like(cond), dict(extra, pooled_output=torch.zeros_like(pooled))]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["flux", "sd3"], default="flux")
    parser.add_argument("--double", type=int, default=1, help="Flux double-stream blocks (Flux: 19)")
    parser.add_argument("--single", type=int, default=2, help="Flux single-stream blocks (Flux: 38)")
    parser.add_argument("--blocks", type=int, default=2, help="SD3 joint blocks (SD3.5 Medium: 24)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: 1024 GPU, 256 CPU)")
    parser.add_argument("--text-tokens", type=int, default=256, help="prompt tokens (Flux dev's T5: 256 or 512)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20 GPU, 1 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timed runs (default 3 GPU, 1 CPU)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                        help="weights and compute (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--narrow", action="store_true", help="128 wide instead of the full width, for smoke runs")
    args = parser.parse_args()
    for name in ("steps", "repeats", "text_tokens"):  # before the defaults fill None
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}")
    import torch

    args.gpu = torch.cuda.is_available() and not args.cpu
    args.size = args.size or (1024 if args.gpu else 256)
    args.steps = args.steps or (20 if args.gpu else 1)
    args.repeats = args.repeats or (3 if args.gpu else 1)
    args.dtype = args.dtype or ("bf16" if args.gpu else "fp32")
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16 (latent / 8, then 2x2 patches), got {args.size}")
    cfg = 1.0 if args.model == "flux" else 4.5

    host = _common.load_host(not args.gpu)
    patching = host.module("nodes.patching")
    AttentionTechnique = host.module("attention_patches").AttentionTechnique
    style_nodes = host.module("nodes.style_aligned")
    segment = host.module("nodes.segment")
    with torch.inference_mode():
        model, params = build(args, _common.torch_dtype(args.dtype))
        routed = model.clone()

        class PassThrough(AttentionTechnique):
            families = frozenset({"flux", "sd3"})

        patching.attach_router(routed, families=("flux", "sd3")).add(PassThrough())
        styled = _common.run_node(style_nodes.SharedAttentionStyleAlign, model=model)[0]
        recording = _common.run_node(segment.AttentionRecorderNode, model=model)[0]
        positive, negative = conditioning(args, 1)
        latent = args.size // 8
        noise = torch.randn(BATCH, 16, latent, latent, generator=torch.Generator().manual_seed(1))

    run = lambda m: lambda n: _common.sample(m, noise, n, cfg, positive, negative)  # noqa: E731
    s = SimpleNamespace(args=args)
    measured = _common.compare({"unpatched": run(model), "router, pass-through technique": run(routed),
                                "StyleAligned": run(styled), "AttentionRecorder": run(recording)}, s)
    name = "Flux" if args.model == "flux" else "SD3.5 Medium"
    width = "128 wide (narrow)" if args.narrow else "at full width"
    blocks = (f"{args.double} double + {args.single} single blocks of 19 + 38" if args.model == "flux"
              else f"{args.blocks} joint blocks of 24")
    tokens = args.text_tokens + math.ceil(latent / 2) ** 2
    rows = _common.rows(name, measured, "unpatched", target={"router, pass-through technique": "≈ 1.00"},
                        notes={"unpatched": f"batch {BATCH}, {tokens} tokens a sequence"})
    device = torch.cuda.get_device_name() if args.gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; model: {name} architecture {width}, {blocks} ({params / 1e6:.0f} M parameters), "
          f"random weights; image {args.size}x{args.size}, {args.text_tokens} text tokens; {args.dtype}; "
          f"{args.steps} step(s), cfg {cfg:g}; median of {args.repeats} interleaved run(s)")
    print(_common.markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
