"""The whole speed table: every technique against the same graph unpatched, in one
process, as markdown on stdout and in a file.

    python benchmarks/all.py                        # GPU: SDXL 1024² fp16 (Cross-Image: SD1.5 512²)
    python benchmarks/all.py --cpu --model sd15 --size 256 --steps 2
    python benchmarks/all.py --unet narrow --size 64 --steps 1 --out /tmp/smoke.md   # smoke run

Runs benchmarks/router_overhead.py, style_aligned.py, inversion_speed.py, recording.py,
bounded.py, cross_image.py, prompt_to_prompt.py and plug_and_play.py with one model per architecture built once, each at its
own step count (`--steps` sets all of them), interleaved repeats, median. The GPU step
counts are chosen so the whole table fits 8 minutes on one H100 (estimated from the
UNet calls each benchmark makes; not yet run on one). A benchmark
that fails (e.g. out of memory) gets a row saying so and the others still run; the file
is rewritten after each benchmark, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
import traceback
from pathlib import Path

import _common
import bounded
import cross_image
import inversion_speed
import plug_and_play
import prompt_to_prompt
import recording
import router_overhead
import style_aligned

BENCHMARKS = {"router": router_overhead, "style_aligned": style_aligned, "inversion": inversion_speed,
              "recording": recording, "bounded": bounded, "cross_image": cross_image,
              "prompt_to_prompt": prompt_to_prompt, "plug_and_play": plug_and_play}
# Fewer steps than the scripts' own GPU defaults, so the whole table fits 8 minutes on one H100;
# the ratios are per step, except Bounded's and Cross-Image's, which keep the papers' proportions.
GPU_STEPS = {"router": 10, "style_aligned": 10, "inversion": 20, "recording": 10, "bounded": 30, "cross_image": 50,
             "prompt_to_prompt": 20, "plug_and_play": 20}
COLUMNS = ("setting",) + _common.COLUMNS


def markdown(header: list[str], table_rows: list[dict]) -> str:
    lines = [f"- {line}" for line in header] + ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in table_rows]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_arguments(parser, gpu_steps=0, cpu_steps=2, cfg=None,
                          steps_help="sampling steps of every benchmark (default: each one's own: on a GPU all.py's "
                                     "GPU_STEPS, on the CPU each script's CPU default)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these benchmarks only")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default: benchmarks/results/<device>-<model>.md)")
    args = parser.parse_args()
    _common.check(parser, args)
    steps_given, size_given = args.steps is not None, args.size is not None
    args = _common.resolve(args)
    host = _common.load_host(not args.gpu)
    setups: dict[str, _common.Setup] = {}
    header = [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; command: "
              f"`python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`".replace("  ", " ")]
    table_rows: list[dict] = []
    started = time.perf_counter()
    out = args.out
    for name in args.only or BENCHMARKS:
        benchmark = BENCHMARKS[name]
        families = getattr(benchmark, "FAMILIES", _common.FAMILIES)
        family = args.model if args.model in families else families[0]
        steps = args.steps if steps_given else (GPU_STEPS[name] if args.gpu else benchmark.CPU_STEPS)
        steps = max(steps, getattr(benchmark, "MIN_STEPS", 1))
        own = argparse.Namespace(**dict(vars(args), model=family, steps=steps, cfg=args.cfg or benchmark.CFG))
        if args.gpu and not size_given:
            own.size = _common.GPU_SIZE[family]
        if family not in setups:
            setups[family] = _common.setup(own, host)
            header.append(setups[family].describe(run=False))
        s = dataclasses.replace(setups[family], args=own)
        setting = f"{s.model_name()}, {own.size}², {own.dtype}, {steps} steps, cfg {own.cfg:g}"
        print(f"[{time.perf_counter() - started:6.0f} s] {name}: {setting}", file=sys.stderr, flush=True)
        try:
            measured = _common.measure(benchmark, s)
        except Exception as error:  # noqa: BLE001  one failure (e.g. out of memory) must not lose the rest
            traceback.print_exc()
            reason = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")[:300]
            measured = [{"technique": name, "run": "failed", "notes": reason}]
            if args.gpu:
                import torch

                torch.cuda.empty_cache()
        table_rows += [dict(row, setting=setting) for row in measured]
        if out is None:
            device = s.device.split(";")[0].replace(" ", "_").replace("(", "").replace(")", "")
            out = Path(__file__).parent / "results" / f"{device}-{args.unet}-{args.model}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(header + [f"total {time.perf_counter() - started:.0f} s"], table_rows))
    text = out.read_text()
    print(text)
    print(f"written to {out}", file=sys.stderr)
    if any(r["run"] == "failed" for r in table_rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
