"""SharedAttentionStyleAlign on Flux and SD3 (math in attention_patches/dit_style_aligned.py).

What the patch puts on the node's own clone: the router's DiT hooks (block replace patches,
the chained attention override, the latent wrapper; nodes/patching.py), the DitStyleAligned
technique on the router, the OUTER_SAMPLE check of reference_index / share_with (and memory)
against the latent batch, and, unless reference_gets_control, an APPLY_MODEL wrapper that
zeroes the reference rows of the ControlNet residuals (ComfyUI hands apply_model the
residuals already computed, so one wrapper serves Flux and SD3).

UNet-only inputs: `blocks` (UNet input/middle/output; DiTs take `dit_blocks`) and shared
GroupNorm (a DiT has none: LayerNorm/RMSNorm are per token, so sharing them changes nothing).
"""

from __future__ import annotations

import math

import torch

import comfy.patcher_extension

from ..attention_patches.dit_style_aligned import DIT_BLOCK_CHOICES, DitStyleAligned, dit_sharing_layers
from ..attention_patches.call import ChunkLayout
from ..attention_patches.shared_attention import shared_attention_extra_bytes
from ..attention_patches.style_aligned import StyleAlignedSettings, zero_reference_control
from .patching import attach_router

__all__ = ["DIT_BLOCK_CHOICES", "apply_dit_style_aligned", "check_dit_inputs"]

NODE = "SharedAttentionStyleAlign"
RUN_WRAPPER_KEY = "attention_lab.style_aligned.run"
CONTROL_WRAPPER_KEY = "attention_lab.style_aligned.dit_control"


class ReferenceWithoutControl:
    """APPLY_MODEL wrapper: the reference image gets no ControlNet residuals (the paper's choice)."""

    def __init__(self, technique: DitStyleAligned):
        self.technique = technique

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        layout = ChunkLayout.of(x.shape[0], transformer_options.get("cond_or_uncond"))
        if control and layout.images > 1:
            control = zero_reference_control(control, self.technique.settings.groups(layout), x.shape[0])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def __deepcopy__(self, memo):
        return self


def check_dit_inputs(family: str, blocks: str, share_group_norm: str) -> None:
    """Refuse UNet-only settings on a DiT, naming the input, before anything is patched."""
    name = {"flux": "Flux", "sd3": "SD3"}[family]
    if (blocks or "all").strip().lower() != "all":
        raise ValueError(f"{NODE}: blocks: {blocks!r} names UNet blocks, and the model is {name}; leave blocks at "
                         "'all' and choose the transformer blocks with dit_blocks")
    if share_group_norm == "on":
        raise ValueError(f"{NODE}: share_group_norm: the model is {name}, which has no GroupNorm layers to share; "
                         "use 'auto' or 'off'")


def dit_extra_bytes(model, technique: DitStyleAligned, images: int, height: int, width: int, text_tokens: int) -> int:
    """What StyleAligned needs beyond unpatched sampling in one shared layer, for a CFG batch of `images`.

    The shared slices of style_aligned.shared_attention over the joint sequence, plus the
    copies this adapter makes of a whole layer's q/k/v (layout change, AdaIN'd q and k).
    """
    if not technique.layers:
        return 0
    settings = technique.settings
    diffusion_model = model.model.diffusion_model
    patch = diffusion_model.patch_size
    tokens = text_tokens + math.ceil(height / patch) * math.ceil(width / patch)
    channels = diffusion_model.hidden_size
    itemsize = torch.empty((), dtype=model.model_dtype()).element_size()
    rows = 2 * images
    sharing = images - 1 if settings.share_with is None else len(set(settings.share_with) - {settings.reference_index})
    copies = 5 * rows * tokens * channels * itemsize
    return shared_attention_extra_bytes(rows, 2 * sharing, tokens, channels, itemsize, settings.attention,
                                        False) + copies


def prompt_tokens(guider) -> int:
    """The longest prompt's token count among the guider's conds (0 when it cannot be read)."""
    longest = 0
    for conds in (getattr(guider, "conds", None) or {}).values():
        for cond in conds or []:
            cross_attn = cond.get("cross_attn") if isinstance(cond, dict) else None
            if isinstance(cross_attn, torch.Tensor) and cross_attn.ndim == 3:
                longest = max(longest, int(cross_attn.shape[1]))
    return longest


def _dit_run(technique: DitStyleAligned):
    from .style_aligned import StyleAlignedRun  # the UNet node's module imports this one

    class DitStyleAlignedRun(StyleAlignedRun):
        """The UNet path's OUTER_SAMPLE check, with the DiT's memory estimate (it needs the prompt's length)."""

        text_tokens = 0

        def __call__(self, executor, noise, *args, **kwargs):
            self.text_tokens = prompt_tokens(executor.class_obj)
            return super().__call__(executor, noise, *args, **kwargs)

        def extra_bytes(self, model, images, height, width):
            return dit_extra_bytes(model, self.technique, images, height, width, self.text_tokens)

    return DitStyleAlignedRun(technique, False)


def apply_dit_style_aligned(model, family: str, settings: StyleAlignedSettings, dit_blocks: str,
                            only_self_level: float, reference_control: bool = False):
    """The patched clone. Applying the node again on its output replaces the earlier settings."""
    if settings.attention.full_attention_share:
        raise ValueError(f"{NODE}: full_attention_share is not offered on Flux and SD3 (it would join the "
                         "images' text tokens too); turn it off")
    patched = model.clone()
    router = attach_router(patched, node=NODE, families=("unet", "flux", "sd3"))
    layers = dit_sharing_layers(router.layers, family, dit_blocks, only_self_level, node=NODE)
    for earlier in [t for t in router.techniques if isinstance(t, DitStyleAligned)]:
        router.remove(earlier)
    technique = router.add(DitStyleAligned(settings, layers))
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    patched.remove_wrappers_with_key(outer, RUN_WRAPPER_KEY)
    patched.add_wrapper_with_key(outer, RUN_WRAPPER_KEY, _dit_run(technique))
    apply = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    patched.remove_wrappers_with_key(apply, CONTROL_WRAPPER_KEY)
    if not reference_control:
        patched.add_wrapper_with_key(apply, CONTROL_WRAPPER_KEY, ReferenceWithoutControl(technique))
    return patched
