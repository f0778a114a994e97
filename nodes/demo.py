"""DemoModelLoader: the pack's built-in model, trained on the demo world, so example workflows run anywhere.

The weights are `demo/weights/demo_model.safetensors` in this repo (made by
`python demo/train.py`); the environment variable ATTENTION_LAB_DEMO_WEIGHTS
points the loader at another file of that format (e.g. smoke weights from
`python demo/train.py --smoke --out /tmp/demo/demo_model.safetensors`).

No checkpoint can be downloaded where this pack is developed, so the demo model
is built here from ComfyUI's own classes, the ones a real checkpoint loads into
(UNetModel with SpatialTransformer blocks, the CLIP text model behind the
standard CLIP tokenizer, TAESD), so every patch path is the real one: an SD1.5
block structure at 1/10 of its width (`UNET_CONFIG`) and a 2-layer, 64-wide
text model (`TEXT_CONFIG`). `random_unet` and `text_encoder` give them seeded
random weights (where demo/train.py starts); `load_demo_model` fills them with
the trained weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
from comfy_api.latest import io

from ..demo import world

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "weights" / "demo_model.safetensors"
WEIGHTS_ENV = "ATTENTION_LAB_DEMO_WEIGHTS"

TEXT_HIDDEN = 64  # width of the demo text encoder = the UNet's context_dim

# SD1.5's block structure (4 levels, one transformer per attention block, 16
# layers), at 1/10 of its width.
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
    "context_dim": TEXT_HIDDEN, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 4 * TEXT_HIDDEN, "num_attention_heads": 4, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": TEXT_HIDDEN,
    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1,
    "model_type": "clip_text_model", "torch_dtype": "float32",
}


def seeded_init(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter deterministically.

    ComfyUI allocates model weights uninitialised (a checkpoint overwrites
    them), so a model without a checkpoint must be initialised explicitly:
    fan-in scaled normal weights, unit norm scales, zero biases.
    """
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if isinstance(sub, norms):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
                elif name == "vae_scale":
                    p.fill_(1.0)
                else:
                    p.zero_()


def build_unet(config_cls, unet_config: dict, seed: int, dtype=torch.float32, weights: dict | None = None):
    """A ModelPatcher over a UNet of `unet_config`: seeded random, or `weights` (its state dict, strict)."""
    unet_config = dict(unet_config, dtype=dtype)
    model_config = config_cls(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    if weights is None:
        seeded_init(model.diffusion_model, seed)
        with torch.no_grad():
            # Scale the output layer so the predicted noise has roughly unit scale,
            # as a trained model's does: the techniques' effects then show in the output.
            model.diffusion_model.out[-1].weight.mul_(2.0)
    else:
        model.diffusion_model.load_state_dict(weights, strict=True)
    model.diffusion_model.to(dtype)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


class SD15Demo(comfy.supported_models.SD15):
    """SD1.5 with the demo UNet's 2 attention heads."""

    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}


def random_unet(seed: int = 0, dtype=torch.float32):
    """The demo UNet (SD1.5 blocks, `UNET_CONFIG`) with seeded random weights: where demo/train.py starts."""
    return build_unet(SD15Demo, UNET_CONFIG, seed, dtype)


def text_encoder(seed: int = 0, config: dict = TEXT_CONFIG, weights: dict | None = None) -> comfy.sd.CLIP:
    """A ComfyUI CLIP: the standard CLIP-L tokenizer over a small text model (default 2 layers,
    64 wide); seeded random, or `weights` (the state dict of its cond_stage_model, strict)."""

    class TinyClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(
                device=device, dtype=dtype, model_options=model_options,
                clip_model=comfy.sd1_clip.SDClipModel, textmodel_json_config=config,
            )

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClipModel)
    clip = comfy.sd.CLIP(target=target)
    if weights is None:
        seeded_init(clip.cond_stage_model, seed)
    else:
        clip.cond_stage_model.load_state_dict(weights, strict=True)
    return clip


# How demo/train.py's save() stores the text encoder's token table: only the rows of
# the world's vocabulary (the others never received a gradient and must be zero).
TOKEN_EMBEDDING = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
TOKEN_IDS = "token_ids"


def split_prefixed(tensors: dict, prefix: str) -> dict:
    """The entries of `tensors` under `prefix`, with the prefix removed."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def restore_token_embedding(text_weights: dict, vocab_size: int) -> dict:
    """The text encoder's state dict with its full token table: the stored rows at their
    token ids, every other row zero."""
    weights = dict(text_weights)
    rows, ids = weights.pop(TOKEN_EMBEDDING), weights.pop(TOKEN_IDS).long()
    table = torch.zeros(vocab_size, rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    weights[TOKEN_EMBEDDING] = table
    return weights


def _build_demo_model(path: Path):
    """(ModelPatcher, CLIP, VAE) from the safetensors file demo/train.py writes.

    The file holds float16 tensors under `unet.`, `clip.`, `vae.` and, in its metadata,
    the UNet and text configs it was trained with; they are loaded into the builders
    above in float32 (the models are small; fp32 keeps every backend happy on the CPU).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    unet_config, text_config = json.loads(metadata["unet_config"]), json.loads(metadata["text_config"])
    model = build_unet(SD15Demo, unet_config, seed=0, weights=split_prefixed(tensors, "unet."))
    text_weights = restore_token_embedding(split_prefixed(tensors, "clip."), text_config["vocab_size"])
    clip = text_encoder(config=text_config, weights=text_weights)
    vae = comfy.sd.VAE(sd={key: value.float() for key, value in split_prefixed(tensors, "vae.").items()})
    return model, clip, vae


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
        _loaded[key] = _build_demo_model(path)
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
