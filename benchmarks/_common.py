"""Shared set-up of the benchmarks: a ComfyUI host in-process, the SDXL timing models and
their command line, UNet row counting, timing and memory helpers."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import headless  # noqa: E402


def load_host(cpu: bool | None = None) -> headless.Host:
    """ComfyUI in this process with the pack loaded as its custom node; on the CPU when
    `cpu` or when there is no CUDA, else on the device ComfyUI picks."""
    root, how = headless.find_comfyui()
    if root is None:
        raise SystemExit(how)
    print(f"ComfyUI host: {how}")
    import torch

    return headless.Host(root, cpu=bool(cpu) or not torch.cuda.is_available())


def pack_module(host: headless.Host, name: str):
    """One of the pack's modules as the host loaded it, e.g. pack_module(host, "nodes.bounded")."""
    return importlib.import_module(f"{host.pack.__name__}.{name}")


class RowCounter:
    """A UNet function wrapper that counts the batch rows of every UNet call."""

    def __init__(self):
        self.rows: list[int] = []

    def __call__(self, apply_model, call):
        self.rows.append(call["input"].shape[0])
        return apply_model(call["input"], call["timestep"], **call["c"])

    def clear(self):
        self.rows.clear()

    def __deepcopy__(self, memo):
        return self  # samplers deep-copy model_options: the copies must count into this object


# ----------------------------------------------------------------------------- SDXL timing runs


def sdxl_arguments(description: str, steps: tuple[int, int], cfg: float, batch: bool = False) -> argparse.Namespace:
    """The command line of the SDXL timing benchmarks; `steps` is (GPU default, CPU default).
    GPU defaults: the full SDXL UNet in fp16 at 1024²; CPU: the narrow test UNet in fp32 at 256²."""
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=["full", "narrow"], default="full" if cuda else "narrow",
                        help="full SDXL UNet, or the narrow SDXL-structured test UNet")
    parser.add_argument("--size", type=int, default=1024 if cuda else 256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=steps[0] if cuda else steps[1])
    if batch:
        parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=cfg)
    parser.add_argument("--repeats", type=int, default=3 if cuda else 1, help="timed runs per variant (median)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16" if cuda else "fp32")
    return parser.parse_args()


def torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def sdxl_model(tiny, dtype, full: bool):
    """The full SDXL UNet (2.6 B parameters) or the narrow test one, random weights."""
    import comfy.supported_models

    if not full:
        return tiny.sdxl_unet(seed=0, dtype=dtype)
    config = dict(tiny.SDXL_UNET, model_channels=320, channel_mult=[1, 2, 4], num_head_channels=64,
                  context_dim=2048, adm_in_channels=2816)
    return tiny._unet(comfy.supported_models.SDXL, config, seed=0, dtype=dtype)


def sdxl_conditioning(tiny, batch: int, full: bool):
    """(positive, negative): random SDXL text conditioning of the model's widths."""
    import torch

    g = torch.Generator().manual_seed(0)
    pooled, context = (1280, 2048) if full else (tiny.SDXL_POOLED, tiny.TEXT_HIDDEN)
    extra = {"pooled_output": torch.randn(batch, pooled, generator=g), "width": 1024, "height": 1024}
    cond = torch.randn(batch, 77, context, generator=g)
    negative = [[torch.zeros_like(cond), dict(extra, pooled_output=torch.zeros_like(extra["pooled_output"]))]]
    return [[cond, extra]], negative


def sample_timed(model, noise, steps, cfg, positive, negative):
    """(seconds, peak CUDA bytes or None) of one comfy.sample.sample run, euler, normal."""
    import comfy.sample
    import torch

    cuda = torch.cuda.is_available() and model.load_device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, torch.zeros_like(noise),
                        seed=0, disable_pbar=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else None


def describe_sdxl_run(args, full: bool, batch: int = 1) -> None:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {name}; torch {torch.__version__}; attention: PyTorch SDPA")
    print(f"config: {'full' if full else 'narrow (test)'} SDXL UNet, random weights, {args.dtype}, "
          f"{args.size}x{args.size}, batch {batch}, {args.steps} steps, cfg {args.cfg}, euler; "
          f"median of {args.repeats} run(s) after one warm-up")


def device_name(cpu: bool = False) -> str:
    import torch

    if torch.cuda.is_available() and not cpu:
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def timed(fn, repeats: int = 3):
    """Best wall time of `repeats` runs (after one warm-up) and peak CUDA memory (bytes, or None)."""
    import torch

    fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return best, peak


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    line = lambda values: "  ".join(str(v).ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(keys), line("-" * w for w in widths)] + [line(r[k] for k in keys) for r in rows])
