"""Shared set-up of the benchmarks: a ComfyUI host in-process, timing and memory helpers."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import headless  # noqa: E402


def load_host() -> headless.Host:
    root, how = headless.find_comfyui()
    if root is None:
        raise SystemExit(how)
    print(f"ComfyUI host: {how}")
    import torch

    return headless.Host(root, cpu=not torch.cuda.is_available())


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
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
