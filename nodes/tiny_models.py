"""Small SD1.5- and SDXL-architecture models built from ComfyUI's own classes.

No checkpoint can be downloaded where this pack is developed, so the demo
model and the test fixtures are built here, through the same ComfyUI classes a
real checkpoint loads into (UNetModel with SpatialTransformer blocks, the CLIP
text model behind the standard CLIP tokenizer, TAESD), so every patch path is
the real one. The builders give seeded random weights (the `tiny` test
fixtures: pictures are noise, the plumbing is exact); `load_demo_model` fills
the same builders with the weights `demo/train.py` trained on the demo world.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd

TEXT_HIDDEN = 64  # width of the small text encoder = the UNet's context_dim

# SD1.5's block structure (4 levels, one transformer per attention block, 16
# layers), at 1/10 of its width.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
    "context_dim": TEXT_HIDDEN, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# SDXL's block structure (3 levels, transformer depths 2 and 10, 70 layers),
# narrow, with a small pooled text embedding (ADM = pooled + 6 size embeddings × 256).
SDXL_POOLED = 64
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": SDXL_POOLED + 6 * 256,
    "context_dim": TEXT_HIDDEN, "num_head_channels": 16,
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


def _unet(config_cls, unet_config: dict, seed: int, dtype=torch.float32, weights: dict | None = None):
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


class _SD15Tiny(comfy.supported_models.SD15):
    unet_extra_config = {"num_heads": 2, "num_head_channels": -1}


class _SD20TinyV(comfy.supported_models.SD20):
    """SD2.x-style v-prediction (SD2's model_type() reads v from the config here)."""

    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    def model_type(self, state_dict, prefix=""):
        import comfy.model_base

        return comfy.model_base.ModelType.V_PREDICTION


def sd15_unet(seed: int = 0, dtype=torch.float32):
    return _unet(_SD15Tiny, SD15_UNET, seed, dtype)


def sd2v_unet(seed: int = 0, dtype=torch.float32):
    config = dict(SD15_UNET, use_linear_in_transformer=True)
    return _unet(_SD20TinyV, config, seed, dtype)


def sdxl_unet(seed: int = 0, dtype=torch.float32):
    return _unet(comfy.supported_models.SDXL, SDXL_UNET, seed, dtype)


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


def taesd_vae(seed: int = 0) -> comfy.sd.VAE:
    """A ComfyUI VAE in the TAESD architecture (ComfyUI recognises it by its keys)."""
    module = comfy.taesd.taesd.TAESD()
    seeded_init(module, seed)
    return comfy.sd.VAE(sd=module.state_dict())


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


def load_demo_model(path: Path):
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
    model = _unet(_SD15Tiny, unet_config, seed=0, weights=split_prefixed(tensors, "unet."))
    text_weights = restore_token_embedding(split_prefixed(tensors, "clip."), text_config["vocab_size"])
    clip = text_encoder(config=text_config, weights=text_weights)
    vae = comfy.sd.VAE(sd={key: value.float() for key, value in split_prefixed(tensors, "vae.").items()})
    return model, clip, vae
