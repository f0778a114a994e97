"""Small seeded-random SD1.5-, SD2.x- and SDXL-architecture models: the test fixtures (the `tiny`
fixture) and the benchmarks' narrow UNets.

Built through the demo model's builders (nodes/demo.py) from ComfyUI's own classes,
so every patch path is the real one; the weights are seeded random (pictures are
noise, the plumbing is exact). Import after the host is loaded (they import ComfyUI).
"""

from __future__ import annotations

import torch

import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
from attention_lab.nodes import demo
from attention_lab.nodes.demo import TEXT_CONFIG, TEXT_HIDDEN, build_unet, seeded_init, text_encoder  # noqa: F401

SD15_UNET = demo.UNET_CONFIG  # the demo model's UNet: SD1.5's blocks at 1/10 of the width

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


class _SD20TinyV(comfy.supported_models.SD20):
    """SD2.x-style v-prediction (SD2's model_type() reads v from the config here)."""

    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    def model_type(self, state_dict, prefix=""):
        import comfy.model_base

        return comfy.model_base.ModelType.V_PREDICTION


def sd15_unet(seed: int = 0, dtype=torch.float32):
    return demo.random_unet(seed, dtype)


def sd2v_unet(seed: int = 0, dtype=torch.float32):
    config = dict(SD15_UNET, use_linear_in_transformer=True)
    return build_unet(_SD20TinyV, config, seed, dtype)


def sdxl_unet(seed: int = 0, dtype=torch.float32):
    return build_unet(comfy.supported_models.SDXL, SDXL_UNET, seed, dtype)


def taesd_vae(seed: int = 0) -> comfy.sd.VAE:
    """A ComfyUI VAE in the TAESD architecture (ComfyUI recognises it by its keys)."""
    module = comfy.taesd.taesd.TAESD()
    seeded_init(module, seed)
    return comfy.sd.VAE(sd=module.state_dict())


def stub_controlnet(asked):
    """A stand-in ControlNet: records the rows it is asked for and adds 3 to the middle block's output."""
    import comfy.controlnet

    class Control(comfy.controlnet.ControlBase):
        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            asked.append(x_noisy.shape[0])
            return {"input": [], "middle": [torch.full((x_noisy.shape[0], 1, 1, 1), 3.0)], "output": []}

        def copy(self):
            return self

        def inference_memory_requirements(self, dtype):
            return 0

    return Control()
