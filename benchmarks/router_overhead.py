"""Cost of the attention router itself: sampling with the router on (a pass-through
technique on every layer) against the unpatched model.

    python benchmarks/router_overhead.py            # tiny SD1.5 + SDXL on CPU, or SDXL 1024² fp16 on CUDA

Prints one table: seconds per step and the ratio (target ≈ 1.00: the router adds
Python dispatch per layer, no tensor work).
"""

from __future__ import annotations

import importlib

import _common


def main():
    host = _common.load_host()
    import comfy.sample
    import torch

    tiny = host.pack.nodes.tiny_models
    patching = importlib.import_module(host.pack.__name__ + ".nodes.patching")
    AttentionTechnique = host.pack.attention_patches.AttentionTechnique

    cuda = torch.cuda.is_available()
    configs = [("sdxl", torch.float16, 128, 20)] if cuda else [("sd15", torch.float32, 16, 10), ("sdxl", torch.float32, 16, 10)]
    rows = []
    for family, dtype, size, steps in configs:
        model = {"sd15": tiny.sd15_unet, "sdxl": tiny.sdxl_unet}[family](dtype=dtype)
        cond = torch.randn(1, 77, tiny.TEXT_HIDDEN)
        extra = {"pooled_output": torch.randn(1, tiny.SDXL_POOLED), "width": size * 8, "height": size * 8}
        positive, negative = [[cond, dict(extra)]], [[cond * 0, dict(extra)]]
        noise = torch.randn(4, 4, size, size)

        def run(m):
            return lambda: comfy.sample.sample(m, noise, steps, 5.0, "euler", "normal", positive, negative,
                                               torch.zeros_like(noise), seed=0, disable_pbar=True)

        routed = model.clone()
        patching.attach_router(routed).add(AttentionTechnique())
        base_t, base_mem = _common.timed(run(model))
        routed_t, routed_mem = _common.timed(run(routed))
        rows.append({
            "model": f"{family} tiny", "dtype": str(dtype).replace("torch.", ""), "latent": f"4x{size}x{size}",
            "steps": steps, "unpatched s/step": f"{base_t / steps:.4f}", "router s/step": f"{routed_t / steps:.4f}",
            "ratio": f"{routed_t / base_t:.3f}",
            "peak MiB (unpatched/router)": "-" if base_mem is None else f"{base_mem / 2**20:.0f}/{routed_mem / 2**20:.0f}",
        })
    print(f"device: {_common.device_name()}")
    print(_common.table(rows))


if __name__ == "__main__":
    main()
