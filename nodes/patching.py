"""Puts the attention router on a ComfyUI MODEL: the only place nodes meet the router.

Everything goes through documented ModelPatcher calls (`set_model_attn1_replace`,
`set_model_attn2_replace`) on a clone the node owns; the base model is never
touched, so bypassing a node restores the unpatched model exactly.
"""

from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention

from ..attention_patches import AttentionRouter, find_router, install
from ..attention_patches.dit import DIT_FAMILIES, DitLatentWrapper, dit_layers, install_dit
from ..attention_patches.router import FAMILY_NAMES, family_names


class UnsupportedModelError(ValueError):
    pass


def comfy_backend(q, k, v, heads, mask=None, attn_precision=None, transformer_options=None):
    """ComfyUI's own attention (SDPA on CUDA, or whatever the user launched with).

    Looked up at call time, as ComfyUI's CrossAttention does, so the router
    computes exactly what the unpatched layer would.
    """
    if mask is None:
        return comfy_attention.optimized_attention(
            q, k, v, heads, attn_precision=attn_precision, transformer_options=transformer_options
        )
    return comfy_attention.optimized_attention_masked(
        q, k, v, heads, mask=mask, attn_precision=attn_precision, transformer_options=transformer_options
    )


def model_family(model) -> str:
    """A short name of the model's architecture, for error messages ("SDXL", "Flux", ...)."""
    return type(model.model).__name__


DIT_WRAPPER_KEY = "attention_lab.dit"
# the nodes whose techniques run on Flux and SD3
DIT_NODES = "SharedAttentionStyleAlign, AttentionRecorder with SelfAttnSegment, CrossAttnHeatmap and SelfAttnPCA"


def router_family(model) -> str | None:
    """"unet", "flux" or "sd3": which attention adapter the model takes (None: none of ours).

    Read from the diffusion model's class, so fine-tunes and variants built on
    ComfyUI's Flux or MMDiT classes (Flux dev/schnell/Kontext, SD3, SD3.5) are found.
    """
    import comfy.ldm.flux.model
    import comfy.ldm.modules.diffusionmodules.mmdit

    diffusion_model = model.model.diffusion_model
    if type(diffusion_model) is comfy.ldm.flux.model.Flux:  # subclasses (Chroma...) run their own blocks
        return "flux"
    if isinstance(diffusion_model, comfy.ldm.modules.diffusionmodules.mmdit.MMDiT):
        return "sd3"
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
        return "unet"
    return None


def dit_model_layers(model, node: str = "this node") -> list[tuple[str, int, int]]:
    """The router's layer keys of a Flux or SD3 model, read from its blocks."""
    diffusion_model = model.model.diffusion_model
    family = router_family(model)
    if family == "flux":
        if any(getattr(block, "flipped_img_txt", False) for block in diffusion_model.double_blocks):
            raise UnsupportedModelError(f"{node}: this Flux variant puts image tokens before text tokens, which "
                                        "Attention Lab does not support")
        return dit_layers(len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))
    blocks = diffusion_model.joint_blocks
    return dit_layers(len(blocks), 0, [i for i, b in enumerate(blocks) if b.x_block.x_block_self_attn])


def unet_layers(model, node: str = "this node") -> list[tuple[str, int, int]]:
    """Replace-patch keys (block, block id, transformer index) of every attention layer.

    Read from the loaded UNet itself, so any SD1.x/SD2.x/SDXL-style UNet
    (including fine-tunes with other depths) gets exactly its own layers.
    """
    unet = model.model.diffusion_model
    blocks = [("input", getattr(unet, "input_blocks", None)), ("middle", [getattr(unet, "middle_block", None)]),
              ("output", getattr(unet, "output_blocks", None))]
    if blocks[0][1] is None or blocks[2][1] is None:
        raise UnsupportedModelError(
            f"{node}: the model is {model_family(model)}, which has no UNet attention blocks; "
            f"{node} supports SD1.x, SD2.x and SDXL UNet models (on Flux and SD3: {DIT_NODES})"
        )
    layers = []
    for name, modules in blocks:
        for block_id, block in enumerate(modules):
            if block is None:
                continue
            for module in block.modules():
                if isinstance(module, comfy_attention.SpatialTransformer):
                    layers += [(name, block_id, i) for i in range(len(module.transformer_blocks))]
    if not layers:
        raise UnsupportedModelError(f"{node}: the model ({model_family(model)}) has no transformer layers to patch")
    return layers


def block_downsampling(model) -> dict[tuple[str, int], int]:
    """How many times the UNet has halved the latent before each block runs: `{(kind, block id): halvings}`.

    Read from the UNet's modules (a `Downsample` in an input block halves every later
    block's grid, an `Upsample` ends its output block and doubles the next), so the token
    grid of a block at latent size H×W is H and W halved (rounding up) that many times.
    """
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    unet = model.model.diffusion_model
    halvings, down = {}, 0
    for block_id, block in enumerate(unet.input_blocks):
        down += any(isinstance(m, openaimodel.Downsample) for m in block.modules())
        halvings[("input", block_id)] = down
    halvings[("middle", 0)] = down
    for block_id, block in enumerate(unet.output_blocks):
        halvings[("output", block_id)] = down
        down -= any(isinstance(m, openaimodel.Upsample) for m in block.modules())
    return halvings


def decoder_levels(model, node: str = "this node") -> list[list[tuple[str, int, int]]]:
    """The decoder's attention layers grouped by resolution, highest resolution first."""
    layers = unet_layers(model, node)  # first: it refuses a model that is not a UNet, naming the node
    halvings = block_downsampling(model)
    levels = {}
    for layer in layers:
        if layer[0] == "output":
            levels.setdefault(halvings[("output", layer[1])], []).append(layer)
    return [levels[down] for down in sorted(levels)]


def layer_downsampling(model, node: str = "this node") -> dict[tuple[str, int, int], int]:
    """How many times the UNet has halved the latent before each attention layer runs (`block_downsampling`)."""
    layers = unet_layers(model, node)  # first: it refuses a model that is not a UNet, naming the node
    halvings = block_downsampling(model)
    return {layer: halvings[(layer[0], layer[1])] for layer in layers}


def router_of(model) -> AttentionRouter | None:
    """The router on this MODEL, if one of our nodes installed it."""
    return find_router(model.model_options.get("transformer_options", {}).get("patches_replace", {}))


def attach_router(model, node: str = "this node", families=("unet",)) -> AttentionRouter:
    """Install the router on `model` (a clone the caller owns) or return the one there.

    Replace patches (and, on a DiT, the attention override) other packs set before us
    are chained, not overwritten. `families` are the model families the calling node
    supports; any other model is refused here, naming the node and the family.
    """
    family = router_family(model)
    if family not in families:
        name = FAMILY_NAMES.get(family, model_family(model))
        raise UnsupportedModelError(
            f"{node}: the model is {name}; {node} supports {family_names(families)} models"
            + ("" if "flux" in families else f" (on Flux and SD3: {DIT_NODES})")
        )
    if family in DIT_FAMILIES:
        return attach_dit_router(model, family, node)

    def set_patch(patch, kind, layer):
        model.set_model_patch_replace(patch, kind, layer[0], layer[1], layer[2])

    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {})
    return install(replace, set_patch, unet_layers(model, node), attention=comfy_backend)


def attach_dit_router(model, family: str, node: str = "this node") -> AttentionRouter:
    """The router on a Flux or SD3 clone: DiT block patches, the attention override, the latent wrapper."""
    import comfy.patcher_extension

    options = model.model_options.setdefault("transformer_options", {})

    def set_block_patch(patch, block):
        model.set_model_patch_replace(patch, "dit", block[0], block[1])

    def set_override(override):
        # No ModelPatcher setter exists for this slot; model_options is the clone's own (deep-copied) dict.
        model.model_options["transformer_options"]["optimized_attention_override"] = override

    router = install_dit(options, set_block_patch, set_override, family, dit_model_layers(model, node),
                         model.model.diffusion_model.patch_size, attention=comfy_backend,
                         router=router_of(model))
    wrappers = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if not model.get_wrappers(wrappers, DIT_WRAPPER_KEY):
        model.add_wrapper_with_key(wrappers, DIT_WRAPPER_KEY, DitLatentWrapper())
    return router
