"""Tiny random-weight Flux- and SD3-architecture models built from ComfyUI's own classes, on the CPU.

The same classes a Flux or SD3 checkpoint loads into (comfy.ldm.flux.model.Flux,
comfy.ldm.modules.diffusionmodules.mmdit.MMDiT behind model_base.Flux / SD3), at a
width a CPU runs in milliseconds, so every hook the pack uses is the real one. The
text side is any encoder giving TEXT_HIDDEN-wide tokens and a TEXT_HIDDEN pooled
vector (the tests use random conds, the examples the small CLIP of the SD1.5 fixtures);
latents have the real 16 channels.

Import after the ComfyUI host is on sys.path (the `host` fixture).
"""

from __future__ import annotations

import math

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd

from attention_lab.nodes.demo import TEXT_HIDDEN, text_encoder  # noqa: F401 - the tiny CLIP the DiT examples encode with

LATENT_CHANNELS = 16

# Flux's structure (double-stream then single-stream blocks, RoPE over 3 axes, 2×2
# patches) at 64 wide, 4 heads of 16 (= sum of axes_dim), 2 + 4 blocks.
FLUX = {
    "image_model": "flux", "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "patch_size": 2,
    "vec_in_dim": TEXT_HIDDEN, "context_in_dim": TEXT_HIDDEN, "hidden_size": 64, "mlp_ratio": 4.0,
    "num_heads": 4, "depth": 2, "depth_single_blocks": 4, "axes_dim": [4, 6, 6], "theta": 10000,
    "qkv_bias": True, "guidance_embed": True,
}

# SD3's MMDiT (joint blocks, the last one context pre-only; width 64·depth, heads = depth)
# at depth 3; blocks 0 and 1 carry SD3.5 Medium's extra image self-attention.
SD3 = {
    "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "patch_size": 2, "depth": 3,
    "input_size": None, "adm_in_channels": TEXT_HIDDEN, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": TEXT_HIDDEN, "out_features": 64 * 3}},
    "num_patches": 32 * 32, "pos_embed_max_size": 32, "qk_norm": "rms", "x_block_self_attn_layers": [0, 1],
}


def _seeded_init(module: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled normal weights and buffers ComfyUI allocates uninitialised; zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("pos_embed"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("scale") or name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def _model(config_cls, unet_config: dict, seed: int, dtype=torch.float32):
    model_config = config_cls(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    _seeded_init(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def flux_model(seed: int = 0, dtype=torch.float32, guidance_embed: bool = True):
    """Flux dev-like (guidance-distilled: guidance_embed) or schnell-like (without)."""
    config_cls = comfy.supported_models.Flux if guidance_embed else comfy.supported_models.FluxSchnell
    return _model(config_cls, dict(FLUX, guidance_embed=guidance_embed), seed, dtype)


def sd3_model(seed: int = 0, dtype=torch.float32):
    return _model(comfy.supported_models.SD3, SD3, seed, dtype)


def model(family: str, seed: int = 0, dtype=torch.float32):
    """The tiny model of `family` ("flux" or "sd3")."""
    return flux_model(seed, dtype) if family == "flux" else sd3_model(seed, dtype)


def taesd16_vae(seed: int = 0) -> comfy.sd.VAE:
    """A 16-channel TAESD-architecture VAE (as taef1/taesd3), for Flux and SD3 latents."""
    module = comfy.taesd.taesd.TAESD(latent_channels=LATENT_CHANNELS)
    _seeded_init(module, seed)
    return comfy.sd.VAE(sd=module.state_dict())


def conds(seed: int = 0, tokens: int = 7, flux: bool = True, guidance: float = 3.5):
    """A random positive and an all-zero negative conditioning in ComfyUI's list format."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, TEXT_HIDDEN, generator=g)
    pooled = torch.randn(1, TEXT_HIDDEN, generator=g)
    extra = {"pooled_output": pooled}
    if flux:
        extra["guidance"] = guidance
    positive = [[cond, dict(extra)]]
    negative = [[torch.zeros_like(cond), dict(extra, pooled_output=torch.zeros_like(pooled))]]
    return positive, negative
