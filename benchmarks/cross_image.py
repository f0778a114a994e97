"""Cross-Image Attention cost: one transfer against one unpatched generation of the same size and steps.

    python benchmarks/cross_image.py              # the device ComfyUI picks (CUDA if present, else CPU)
    python benchmarks/cross_image.py --cpu --size 256 --steps 20

The baseline is KSampler (euler_ancestral, cfg 1, as the transfer's text CFG is
off) over the inversion's full schedule; the transfer denoises the schedule
after its skipped steps (authors: 68 of 100) with the authors' defaults (swap
guidance 3.5, contrast 1.67, masked AdaIN). The inversions are made once,
outside the timing (DDIMInvert's cost is benchmarks/inversion_speed.py's).
Target on a GPU: ≤ 2.5x the baseline's time (the authors' pipeline: about 5x).
Prints one table with both times, their ratio, peak CUDA memory and UNet rows
per denoising step. Tiny SD1.5-architecture model (random weights: speed is the point).
"""

from __future__ import annotations

import argparse

import _common


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=100, help="inversion steps (authors: 100)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    host = _common.load_host(args.cpu)
    import nodes
    import torch

    tiny = _common.pack_module(host, "nodes.tiny_models")
    inversion = _common.pack_module(host, "nodes.inversion")
    cross_image = _common.pack_module(host, "nodes.cross_image")

    model, clip = tiny.sd15_unet(seed=0), tiny.text_encoder(seed=1)
    counter = _common.RowCounter()
    model.set_model_unet_function_wrapper(counter)
    side = args.size // 8
    positive = cross_image.encode(clip, "A photo of a cat")
    structure_latent = {"samples": torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))}
    appearance_latent = {"samples": torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2))}
    invert = lambda latent: inversion.invert(model, latent["samples"], positive, steps=args.steps,  # noqa: E731
                                             method="ddpm")[1]
    structure, appearance = invert(structure_latent), invert(appearance_latent)

    def generate():
        nodes.KSampler().sample(model, 0, args.steps, 1.0, "euler_ancestral", "ddim_uniform", positive, positive,
                                structure_latent)

    def transfer():
        return cross_image.transfer(model, clip, structure, appearance, "cat", "cat")

    counter.clear()
    _, run = transfer()
    denoised_steps = run.schedule.steps
    transfer_rows = sum(counter.rows) / denoised_steps
    base, base_peak = _common.timed(generate, args.repeats)
    moved, moved_peak = _common.timed(transfer, args.repeats)
    mib = lambda b: "n/a (CPU)" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
    print(f"device: {_common.device_name(args.cpu)}")
    print(_common.table([{
        "model": "sd15 tiny", "image": f"{args.size}x{args.size}", "steps (denoised)": f"{args.steps} ({denoised_steps})",
        "generation s": f"{base:.3f}", "transfer s": f"{moved:.3f}",
        "ratio (target <= 2.5)": f"{moved / base:.2f}",
        "peak MiB (generation, transfer)": f"{mib(base_peak)}, {mib(moved_peak)}",
        "UNet rows/step (transfer; authors 6)": f"{transfer_rows:.2f}",
    }]))


if __name__ == "__main__":
    main()
