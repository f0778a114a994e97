"""Sampling with the attention recorder on against off: time and peak memory, one table.

    python benchmarks/recording.py                  # CPU: tiny SD1.5 at 256 px
    python benchmarks/recording.py --model sdxl     # GPU: SDXL-size UNet (random weights) at 1024 px, fp16

Each variant runs in its own process (so peak memory is its own): the model is
built, sampled once to warm up, then sampled `--repeats` times; the median time
is reported. "record MB" is what the record itself holds (one running sum per
recorded resolution and kind); peak memory is CUDA's max allocated on a GPU and
the process's peak RSS on the CPU. The recorder uses the node's defaults
(AttentionRecorder: layers with at most 32² tokens, encoder and decoder blocks,
every step). The issue's target: ≤ 1.10× time on GPU for SDXL at 1024².
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_pack():
    """ComfyUI (CPU unless CUDA is present) and this pack under the alias `attention_lab`."""
    sys.path.insert(0, str(REPO / "examples"))
    import headless

    root, how = headless.find_comfyui()
    if root is None:
        sys.exit(how)
    for p in [str(root)] + headless.host_pythonpath():
        sys.path.insert(0, p)
    import comfy.cli_args
    import torch

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    comfy.cli_args.args.use_pytorch_cross_attention = True
    if "attention_lab" not in sys.modules:
        package = types.ModuleType("attention_lab")
        package.__path__ = [str(REPO)]
        sys.modules["attention_lab"] = package
    import attention_lab.nodes.tiny_models as tiny
    from attention_lab.nodes import segment

    return segment, tiny


def build(model: str, tiny):
    import torch

    if model == "sd15-tiny":
        return tiny.sd15_unet(seed=0), tiny.TEXT_HIDDEN, None
    # SDXL's real UNet shape (2.6 B parameters), seeded random weights: the timing is the architecture's.
    config = dict(tiny.SDXL_UNET, model_channels=320, context_dim=2048, adm_in_channels=2816, num_head_channels=64)
    import comfy.supported_models

    return tiny._unet(comfy.supported_models.SDXL, config, 0, torch.float16), 2048, 1280


def run_variant(args) -> dict:
    import torch

    segment, tiny = load_pack()
    import comfy.sample

    model, width, pooled = build(args.model, tiny)
    record = None
    if args.variant == "on":
        model, record = segment.AttentionRecorderNode.execute(model, 32, False, 0.0, 1.0).args
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, width, generator=g)
    extra = {"pooled_output": torch.randn(1, pooled, generator=g), "width": args.size, "height": args.size} if pooled else {}
    positive, negative = [[cond, dict(extra)]], [[torch.zeros_like(cond), dict(extra)]]
    noise = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)
    cuda = torch.cuda.is_available()

    def sample():
        out = comfy.sample.sample(model, noise, args.steps, 5.0, "euler", "normal", positive, negative,
                                  torch.zeros_like(noise), seed=0, disable_pbar=True)
        if cuda:
            torch.cuda.synchronize()
        return out

    sample()  # warm-up: model load, kernels
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sample()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record_mb = 0.0
    if record is not None:
        record_mb = sum(record.mean(kind, grid).numel() * 4 for kind in ("self", "cross") for grid in record.grids(kind)) / 2**20
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return {"time": statistics.median(times), "peak_mb": peak, "record_mb": record_mb, "device": device}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15-tiny", "sdxl"], default="sd15-tiny")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 256 tiny, 1024 sdxl)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 tiny, 20 sdxl)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["on", "off"], help=argparse.SUPPRESS)  # one variant, as a child process
    args = parser.parse_args()
    args.size = args.size or (1024 if args.model == "sdxl" else 256)
    args.steps = args.steps or (20 if args.model == "sdxl" else 4)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("off", "on"):
        command = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--size", str(args.size),
                   "--steps", str(args.steps), "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if done.returncode:
            sys.exit(f"variant {variant} failed:\n{done.stderr[-4000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    off, on = results["off"], results["on"]
    print(f"device: {off['device']}; model {args.model}, {args.size}x{args.size}, {args.steps} steps, cfg 5, batch 1, "
          f"median of {args.repeats}")
    print("| recording | time (s) | × off | peak memory (MiB) | record (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| off | {off['time']:.3f} | 1.00 | {off['peak_mb']:.0f} | - |")
    print(f"| on | {on['time']:.3f} | {on['time'] / off['time']:.2f} | {on['peak_mb']:.0f} | {on['record_mb']:.2f} |")


if __name__ == "__main__":
    main()
