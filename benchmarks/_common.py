"""Shared set-up of the speed benchmarks: the ComfyUI host in-process, the models and their
command line, interleaved timing, and the markdown table every script prints.

Models: the full-size SD1.5 (860 M parameters) and SDXL (2.6 B) UNet architectures with
seeded random weights built on the device (speed does not depend on the values), or, with
`--unet narrow`, the pack's narrow test UNets (tests/tiny_models.py: same blocks and attention
layers, 1/10 the width) for smoke runs. Defaults: on a GPU the users' sizes (SD1.5 512², SDXL
1024², fp16); on the CPU a size that finishes (fp32, a few steps).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))  # the pack's loader
sys.path.insert(0, str(REPO / "tests"))  # tiny_models: the narrow test UNets, built after the host is loaded

import headless  # noqa: E402

FAMILIES = ("sd15", "sdxl")
FULL_NAMES = {"sd15": "SD1.5 UNet (860 M)", "sdxl": "SDXL UNet (2.6 B)"}
GPU_SIZE = {"sd15": 512, "sdxl": 1024}

# The UNet configurations of the released checkpoints (what comfy.model_detection reads from
# their state dicts); the model classes add the rest (SD1.5: 8 heads; SDXL: 64-channel heads).
FULL_UNET = {
    "sd15": {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
        "context_dim": 768, "adm_in_channels": None,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "context_dim": 2048,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}
FULL_TEXT = {"sd15": (768, None), "sdxl": (2048, 1280)}  # (context width, pooled width)


def load_host(cpu: bool | None = None) -> headless.Host:
    """ComfyUI in this process with the pack loaded as its custom node (`headless.load_host`: once
    per process, as benchmarks/all.py and the smoke test run several scripts in one); on the CPU
    when `cpu` or when there is no CUDA, else on the device ComfyUI picks."""
    import torch

    host = headless.load_host(cpu=bool(cpu) or not torch.cuda.is_available())
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # KSampler's bars would interleave with the tables
    return host


def node_defaults(node_class) -> dict:
    """The default of every input of a V3 node that has one, by input name."""
    return {i.id: i.default for i in node_class.define_schema().inputs if getattr(i, "default", None) is not None}


def run_node(node_class, **inputs) -> tuple:
    """A node's outputs for its defaults updated by `inputs`, as the UI would run it."""
    return node_class.execute(**dict(node_defaults(node_class), **inputs)).args


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


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, gpu_steps: int, cpu_steps: int, cfg: float | None,
                  families: tuple[str, ...] = FAMILIES, steps_help: str | None = None) -> None:
    parser.add_argument("--model", choices=families, default=None,
                        help=f"architecture (default: {'sdxl' if 'sdxl' in families else families[0]} on a GPU, "
                             f"{families[0]} on the CPU)")
    parser.add_argument("--unet", choices=["full", "narrow"], default="full",
                        help="full: the released architecture's size (random weights); narrow: the pack's test UNet "
                             "of the same blocks at 1/10 the width, for smoke runs")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default: SD1.5 512, SDXL 1024 on a GPU; 512 on the CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help=steps_help or f"sampling steps (default: {gpu_steps} on a GPU, {cpu_steps} on the CPU)")
    parser.add_argument("--cfg", type=float, default=cfg,
                        help="classifier-free guidance scale (default: " + (f"{cfg:g})" if cfg else "each benchmark's own)"))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs of each variant, interleaved; the median is reported (default 3 GPU, 1 CPU)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                        help="UNet weights and compute (default: fp16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.set_defaults(device_defaults=(gpu_steps, cpu_steps, families))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the device-dependent defaults in place."""
    import torch

    gpu_steps, cpu_steps, families = args.device_defaults
    gpu = torch.cuda.is_available() and not args.cpu
    args.gpu = gpu
    args.model = args.model or ("sdxl" if gpu and "sdxl" in families else families[0])
    args.size = args.size or (GPU_SIZE[args.model] if gpu else 512)
    args.steps = args.steps or (gpu_steps if gpu else cpu_steps)
    args.repeats = args.repeats or (3 if gpu else 1)
    args.dtype = args.dtype or ("fp16" if gpu else "fp32")
    return args


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what the UNets or the timing cannot take, before any model is built."""
    if args.size is not None and (args.size < 64 or args.size % 64):
        parser.error(f"--size must be a multiple of 64 (the latent is size/8 and the UNet halves it 3 times), "
                     f"got {args.size}")
    for name in ("steps", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be 1 or more, got {getattr(args, name)}")


def parse(description: str, gpu_steps: int, cpu_steps: int, cfg: float, families=FAMILIES) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, gpu_steps, cpu_steps, cfg, families)
    args = parser.parse_args()
    check(parser, args)
    return resolve(args)


def torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------- models


def random_weights_(module, seed: int) -> None:
    """Seeded fan-in scaled normal weights, unit norm scales, zero biases, drawn on the
    parameters' own device (ComfyUI allocates a UNet uninitialised: a checkpoint fills it)."""
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for index, (name, p) in enumerate(module.named_parameters()):
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if isinstance(owner, norms):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.ndim >= 2:
                g = torch.Generator(device=p.device).manual_seed(seed + index)
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:
                p.zero_()


def unit_output_scale_(unet, family: str) -> None:
    """Scale the output layer so the predicted noise has unit standard deviation, as a
    trained model's has, so sampled latents, guidance losses and KMeans inputs stay in a
    trained model's range (fp16 included). One forward pass at an 8×8 latent measures it."""
    import torch

    parameter = next(unet.parameters())
    context, pooled = FULL_TEXT[family]
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(parameter.device, parameter.dtype)  # noqa: E731
    y = make(1, FULL_UNET[family]["adm_in_channels"]) if pooled else None
    with torch.no_grad():
        out = unet(make(1, 4, 8, 8), torch.tensor([500.0], device=parameter.device), make(1, 77, context), y=y)
        unet.out[-1].weight.div_(out.float().std().clamp(min=1e-6).to(parameter.dtype))


def full_unet(family: str, dtype, seed: int = 0):
    """A ModelPatcher over the released architecture of `family`, random weights, built on
    ComfyUI's torch device in `dtype`."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config_class = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family]
    model_config = config_class(dict(FULL_UNET[family], dtype=dtype))
    model_config.set_inference_dtype(dtype, None)
    device = comfy.model_management.get_torch_device()
    model = model_config.get_model({}, device=device)
    model.diffusion_model.to(device=device, dtype=dtype)
    random_weights_(model.diffusion_model, seed)
    unit_output_scale_(model.diffusion_model, family)
    return comfy.model_patcher.ModelPatcher(model, load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


@dataclass
class Setup:
    """One model on one device at one size: what every benchmark measures against."""

    host: headless.Host
    args: argparse.Namespace
    model: object = None
    fixtures: object = None
    context_width: int = 0
    pooled_width: int | None = None
    device: str = ""
    built: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.args.model

    @property
    def full(self) -> bool:
        return self.args.unet == "full"

    @property
    def latent_side(self) -> int:
        return self.args.size // 8

    def model_name(self) -> str:
        return FULL_NAMES[self.family] if self.full else f"narrow test {self.family} UNet"

    def conditioning(self, batch: int = 1, seed: int = 0):
        """(positive, negative): random text conditioning of the model's widths."""
        import torch

        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(batch, 77, self.context_width, generator=g)
        extra = {}
        if self.pooled_width:
            extra = {"pooled_output": torch.randn(batch, self.pooled_width, generator=g),
                     "width": self.args.size, "height": self.args.size}
        negative_extra = dict(extra)
        if extra:
            negative_extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        return [[cond, extra]], [[torch.zeros_like(cond), negative_extra]]

    def noise(self, batch: int = 1, seed: int = 1):
        import torch

        side = self.latent_side
        return torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(seed))

    def clip(self):
        """A CLIP with the standard tokenizer whose text model emits the UNet's context width
        (SD1.5 widths for the full model; random weights: only tokens and shapes matter)."""
        if "clip" not in self.built:
            config = dict(self.fixtures.TEXT_CONFIG)
            if self.full:
                config.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)
            self.built["clip"] = self.fixtures.text_encoder(seed=1, config=config)
        return self.built["clip"]

    def describe(self, run: bool = True) -> str:
        """The device and the model; with `run`, the size, steps and cfg too."""
        a = self.args
        size = f"image {a.size}x{a.size} (latent {self.latent_side}x{self.latent_side}); " if run else ""
        steps = f"{a.steps} steps, cfg {a.cfg:g}; " if run else ""
        return (f"device: {self.device}; model: {self.model_name()}, random weights; {size}{a.dtype}; {steps}"
                f"median of {a.repeats} interleaved run(s) after a short warm-up; attention: PyTorch SDPA")


def setup(args: argparse.Namespace, host: headless.Host | None = None) -> Setup:
    import torch

    host = host or load_host(not args.gpu)
    import tiny_models as fixtures
    dtype = torch_dtype(args.dtype)
    with torch.inference_mode():  # as ComfyUI's executor loads a checkpoint: the weights are inference tensors
        if args.unet == "full":
            model = full_unet(args.model, dtype)
            context, pooled = FULL_TEXT[args.model]
        else:
            model = {"sd15": fixtures.sd15_unet, "sdxl": fixtures.sdxl_unet}[args.model](seed=0, dtype=dtype)
            context, pooled = fixtures.TEXT_HIDDEN, (fixtures.SDXL_POOLED if args.model == "sdxl" else None)
    device = torch.cuda.get_device_name() if args.gpu else f"CPU ({torch.get_num_threads()} threads)"
    return Setup(host, args, model, fixtures, context, pooled, f"{device}; torch {torch.__version__}")


# ----------------------------------------------------------------------------- timing


def sample(model, noise, steps: int, cfg: float, positive, negative, sampler: str = "euler"):
    """One comfy.sample.sample run (euler, normal schedule), as KSampler runs it."""
    import comfy.sample
    import torch

    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


@dataclass
class Measured:
    seconds: float
    peak_bytes: int | None


def compare(variants: dict, s: Setup, steps: int | None = None, warmup_steps: int = 1) -> dict[str, Measured]:
    """Median wall time and peak CUDA memory of each variant, a callable of the step count.

    Everything runs under torch.inference_mode(), as in ComfyUI's executor (the techniques'
    gradient passes must leave it themselves). Every variant first runs once with
    `warmup_steps` (model load, kernel selection); then
    the repeats are interleaved (variant A, B, C, A, B, C, ...) so drift on a shared machine
    spreads over all of them. `steps` defaults to the setup's. Peak memory is CUDA's max
    allocated over the variant's runs (weights included); None on the CPU, where no
    comparable figure exists.
    """
    import torch

    cuda, steps, repeats = s.args.gpu, steps or s.args.steps, s.args.repeats
    for run in variants.values():
        with torch.inference_mode():
            run(warmup_steps)
    times = {label: [] for label in variants}
    peaks = {label: 0 for label in variants}
    for _ in range(repeats):
        for label, run in variants.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                run(steps)
            if cuda:
                torch.cuda.synchronize()
                peaks[label] = max(peaks[label], torch.cuda.max_memory_allocated())
            times[label].append(time.perf_counter() - start)
    return {label: Measured(statistics.median(times[label]), peaks[label] if cuda else None) for label in variants}


# ----------------------------------------------------------------------------- the table


def device_name(cpu: bool = False) -> str:
    import torch

    if torch.cuda.is_available() and not cpu:
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"


def table(rows: list[dict]) -> str:
    """A plain-text table of dicts with the same keys (benchmarks/quality.py's)."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    line = lambda values: "  ".join(str(v).ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(keys), line("-" * w for w in widths)] + [line(r[k] for k in keys) for r in rows])


COLUMNS = ("technique", "run", "seconds", "× baseline", "peak memory", "memory × baseline", "target", "notes")


def rows(technique: str, measured: dict[str, Measured], baseline: str, target: dict | None = None,
         notes: dict | None = None) -> list[dict]:
    """Table rows for one comparison: every variant against `baseline` (also a row)."""
    base = measured[baseline]
    out = []
    for label, m in measured.items():
        gib = "not measured (CPU)" if m.peak_bytes is None else f"{m.peak_bytes / 2**30:.2f} GiB"
        memory_ratio = "-" if m.peak_bytes is None or not base.peak_bytes else f"{m.peak_bytes / base.peak_bytes:.3f}"
        out.append({
            "technique": technique, "run": label, "seconds": f"{m.seconds:.3f}",
            "× baseline": "1 (baseline)" if label == baseline else f"{m.seconds / base.seconds:.3f}",
            "peak memory": gib, "memory × baseline": memory_ratio,
            "target": (target or {}).get(label, ""), "notes": (notes or {}).get(label, ""),
        })
    return out


def markdown(table_rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in table_rows]
    return "\n".join(lines)


def measure(benchmark, s: Setup) -> list[dict]:
    """A benchmark's table rows, measured under torch.inference_mode() as ComfyUI's executor
    runs a prompt: models, conditioning and latents are inference tensors, as in users' graphs."""
    import torch

    with torch.inference_mode():
        return benchmark.measure(s)


def main(benchmark) -> None:
    """A benchmark script's command line: parse, build the model, measure, print the table.
    `benchmark` is the script's module: its docstring, GPU_STEPS, CPU_STEPS, CFG, FAMILIES
    (default both), MIN_STEPS (default 1) and measure(setup) -> table rows."""
    args = parse(benchmark.__doc__.split("\n\n")[0], benchmark.GPU_STEPS, benchmark.CPU_STEPS, benchmark.CFG,
                 getattr(benchmark, "FAMILIES", FAMILIES))
    args.steps = max(args.steps, getattr(benchmark, "MIN_STEPS", 1))
    s = setup(args)
    print(s.describe())
    table_rows = measure(benchmark, s)
    print()
    print(markdown(table_rows))
