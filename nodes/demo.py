"""DemoModelLoader: the pack's built-in model, trained on the demo world, so example workflows run anywhere.

The weights are `demo/weights/demo_model.safetensors` in this repo (made by
`python demo/train.py`); the environment variable ATTENTION_LAB_DEMO_WEIGHTS
points the loader at another file of that format (e.g. smoke weights from
`python demo/train.py --smoke --out /tmp/demo/demo_model.safetensors`).
"""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

from ..demo import world
from . import tiny_models

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "weights" / "demo_model.safetensors"
WEIGHTS_ENV = "ATTENTION_LAB_DEMO_WEIGHTS"

# The executor runs the loader in every prompt whose cache misses: build the models once
# per process and file version, and hand out clones.
_loaded: dict[tuple[str, int, int], tuple] = {}


def weights_path() -> Path:
    """The demo weights file: $ATTENTION_LAB_DEMO_WEIGHTS if set, else the repo's trained file."""
    override = os.environ.get(WEIGHTS_ENV)
    return Path(override).expanduser() if override else DEFAULT_WEIGHTS


def load_demo_model(path: Path | None = None):
    """(MODEL, CLIP, VAE) of the demo weights at `path` (default: `weights_path()`), cached per process;
    MODEL and CLIP are fresh clones, so patches on them never reach the cached models."""
    path = weights_path() if path is None else Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{WEIGHTS_ENV} must name a .safetensors file written by demo/train.py, got {path}")
    if not path.is_file():
        raise FileNotFoundError(
            f"DemoModelLoader: the demo weights {path} do not exist. Train them with `python demo/train.py` "
            f"(writes {DEFAULT_WEIGHTS.relative_to(DEFAULT_WEIGHTS.parents[2])}), or set {WEIGHTS_ENV} "
            "to a file it wrote (--out)."
        )
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _loaded:
        _loaded[key] = tiny_models.load_demo_model(path)
    model, clip, vae = _loaded[key]
    return model.clone(), clip.clone(), vae


def _vocabulary() -> str:
    styles = ", ".join(world.STYLES.values())
    return (
        f"Prompts use the demo world's words (demo/world.py; the file's demo_model.json lists them): "
        f"objects '<a|an> <colour> <shape>' with colours {', '.join(world.COLORS)} and shapes "
        f"{', '.join(world.SHAPES)}, joined by ', ' and 'and'; optionally 'on a <style> <hue> background' "
        f"with styles {styles} and hues {', '.join(world.BACKGROUND_COLORS)}. "
        "Example: 'a red circle and a blue square on a striped yellow background'."
    )


class DemoModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DemoModelLoader",
            display_name="Demo Model Loader (Attention Lab)",
            category="attention_lab/loaders",
            description=(
                "Loads the pack's small demo model (an SD1.5-architecture UNet, a small CLIP text encoder "
                "behind the standard CLIP tokenizer, a TAESD VAE), trained by demo/train.py on the pack's "
                "procedural demo world of coloured shapes on patterned backgrounds, so the example workflows "
                "make real 128x128 pictures on a CPU in seconds. " + _vocabulary() + " "
                f"Weights: demo/weights/demo_model.safetensors, or the file named by {WEIGHTS_ENV}. "
                "For real images, replace this node by CheckpointLoaderSimple with an SD1.5 or SDXL "
                "checkpoint (and a 512/1024 px latent): its MODEL, CLIP and VAE outputs plug into the same inputs."
            ),
            inputs=[],
            outputs=[
                io.Model.Output(tooltip="The demo UNet (SD1.5 architecture, 16 attention layers, ε-prediction)."),
                io.Clip.Output(tooltip="The demo text encoder: the standard CLIP tokenizer over a small CLIP text model."),
                io.Vae.Output(tooltip="The demo VAE (TAESD architecture, 8x downscale, 4 latent channels)."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*load_demo_model())
