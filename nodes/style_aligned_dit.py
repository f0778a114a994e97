"""SharedAttentionStyleAlign on Flux and SD3 (math in attention_patches/dit_style_aligned.py).

What the patch puts on the node's own clone: the router's DiT hooks (block replace patches,
the chained attention override, the latent wrapper; nodes/patching.py), the DitStyleAligned
technique on the router, and the OUTER_SAMPLE check of reference_index / share_with against
the latent batch that the UNet path uses too.

UNet-only inputs: `blocks` (UNet input/middle/output; DiTs take `dit_blocks`), shared
GroupNorm (a DiT has none: LayerNorm/RMSNorm are per token, so sharing them changes
nothing) and `reference_gets_control` (ControlNet residuals reach every image on a DiT).
"""

from __future__ import annotations

import comfy.patcher_extension

from ..attention_patches.dit_style_aligned import DIT_BLOCK_CHOICES, DitStyleAligned, dit_sharing_layers
from ..attention_patches.style_aligned import StyleAlignedSettings
from .patching import attach_router

__all__ = ["DIT_BLOCK_CHOICES", "apply_dit_style_aligned", "check_dit_inputs"]

NODE = "SharedAttentionStyleAlign"
RUN_WRAPPER_KEY = "attention_lab.style_aligned.run"


def check_dit_inputs(family: str, blocks: str, share_group_norm: str) -> None:
    """Refuse UNet-only settings on a DiT, naming the input, before anything is patched."""
    name = {"flux": "Flux", "sd3": "SD3"}[family]
    if (blocks or "all").strip().lower() != "all":
        raise ValueError(f"{NODE}: blocks: {blocks!r} names UNet blocks, and the model is {name}; leave blocks at "
                         "'all' and choose the transformer blocks with dit_blocks")
    if share_group_norm == "on":
        raise ValueError(f"{NODE}: share_group_norm: the model is {name}, which has no GroupNorm layers to share; "
                         "use 'auto' or 'off'")


def apply_dit_style_aligned(model, family: str, settings: StyleAlignedSettings, dit_blocks: str,
                            only_self_level: float):
    """The patched clone. Applying the node again on its output replaces the earlier settings."""
    from .style_aligned import StyleAlignedRun  # the UNet node's module imports this one

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
    patched.add_wrapper_with_key(outer, RUN_WRAPPER_KEY, StyleAlignedRun(technique, False))
    return patched
