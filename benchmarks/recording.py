"""Attention recording: sampling with AttentionRecorder on against off, and
SelfAttnSegment's extra pass (RecordAttentionPass + SelfAttnSegment on the result)
against the generation it follows.

    python benchmarks/recording.py                       # GPU: SDXL 1024² fp16; CPU: SD1.5 512² fp32
    python benchmarks/recording.py --model sdxl --size 512 --steps 2
    python benchmarks/recording.py --unet narrow --size 64 --steps 1     # smoke run

One image, CFG 5, euler; the nodes' defaults (layers with at most 32² tokens, every
step; segments from the 32² self-attention and 16² cross-attention maps, KMeans 5).
"record MiB" is what the record holds after the run. Target ≤ 1.10× time on a GPU.
"""

from __future__ import annotations

import sys

import _common

GPU_STEPS, CPU_STEPS, CFG = 20, 2, 5.0

TEXT = "a photo of a cat and a dog in a garden"


def record_mib(record, kinds=("self", "cross")) -> float:
    return sum(record.mean(kind, grid).numel() * 4 for kind in kinds for grid in record.grids(kind)) / 2**20


def measure(s: _common.Setup) -> list[dict]:
    segment = s.host.module("nodes.segment")
    steps, cfg = s.args.steps, s.args.cfg
    positive, negative = s.conditioning()
    noise = s.noise()
    recording, record = _common.run_node(segment.AttentionRecorderNode, model=s.model)
    clip = s.clip()

    def generate(steps):
        return _common.sample(s.model, noise, steps, cfg, positive, negative)

    def generate_and_segment(steps):
        latent = {"samples": generate(steps)}
        pass_record, _ = _common.run_node(segment.RecordAttentionPass, model=s.model, positive=positive, latent=latent)
        _common.run_node(segment.SelfAttnSegment, record=pass_record, clip=clip, text=TEXT, latent=latent)
        generate_and_segment.record = pass_record

    measured = _common.compare({
        "unpatched": generate,
        "AttentionRecorder": lambda n: _common.sample(recording, noise, n, cfg, positive, negative),
        "generation + RecordAttentionPass + SelfAttnSegment": generate_and_segment,
    }, s)
    recorded = {"AttentionRecorder": f"record {record_mib(record):.1f} MiB",
                "generation + RecordAttentionPass + SelfAttnSegment":
                    f"one extra UNet pass; record {record_mib(generate_and_segment.record):.1f} MiB"}
    recorded["unpatched"] = "batch 1"
    table = _common.rows("attention recording", {k: measured[k] for k in ("unpatched", "AttentionRecorder")},
                         "unpatched", target={"AttentionRecorder": "≤ 1.10"}, notes=recorded)
    table += _common.rows("SelfAttnSegment", {k: measured[k] for k in ("unpatched",
                                                                        "generation + RecordAttentionPass + SelfAttnSegment")},
                          "unpatched", notes=recorded)[1:]
    return table


if __name__ == "__main__":
    _common.main(sys.modules[__name__])
