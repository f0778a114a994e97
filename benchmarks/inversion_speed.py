"""Inversion cost: DDIMInvert against plain sampling (stock KSampler, ddim) with the same steps, at cfg 1.

    python benchmarks/inversion_speed.py           # the device ComfyUI picks (CUDA if present, else CPU)
    python benchmarks/inversion_speed.py --cpu     # force the CPU

Prints one table: seconds per step of each, their ratio (target ≤ 1.05) and the
UNet calls per step of each, counted with a UNet function wrapper (target: 1 at cfg 1).
Tiny SD1.5 model (random weights: the speed is the point), one 512² image (64×64 latent).
"""

from __future__ import annotations

import argparse

import _common


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    host = _common.load_host(args.cpu)
    import nodes
    import torch

    tiny = _common.pack_module(host, "nodes.tiny_models")
    inversion = _common.pack_module(host, "nodes.inversion")

    model = tiny.sd15_unet(seed=0)
    counter = _common.RowCounter()
    model.set_model_unet_function_wrapper(counter)
    positive = [[torch.randn(1, 77, tiny.TEXT_HIDDEN), {}]]
    latent = {"samples": torch.randn(1, 4, 64, 64)}
    steps, scheduler = args.steps, "ddim_uniform"

    def sample():
        nodes.KSampler().sample(model, 0, steps, 1.0, "ddim", scheduler, positive, positive, latent)

    def invert():
        inversion.DDIMInvert.execute(model, latent, positive, 1.0, steps, scheduler, "ddim", 0)

    rows = {}
    for name, run in (("KSampler (ddim)", sample), ("DDIMInvert", invert)):
        counter.clear()
        run()
        rows[name] = {"calls/step": len(counter.rows) / steps, "seconds": _common.timed(run)[0]}
    base, inv = rows["KSampler (ddim)"]["seconds"], rows["DDIMInvert"]["seconds"]
    print(f"device: {_common.device_name(args.cpu)}")
    print(_common.table([{
        "model": "sd15 tiny", "latent": "1x4x64x64", "steps": steps,
        "KSampler s/step": f"{base / steps:.4f}", "DDIMInvert s/step": f"{inv / steps:.4f}",
        "ratio (target <= 1.05)": f"{inv / base:.3f}",
        "UNet calls/step (KSampler, DDIMInvert)": f"{rows['KSampler (ddim)']['calls/step']:g}, "
                                                  f"{rows['DDIMInvert']['calls/step']:g}",
    }]))


if __name__ == "__main__":
    main()
