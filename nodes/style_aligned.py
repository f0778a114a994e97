"""SharedAttentionStyleAlign: StyleAligned shared attention as a MODEL patch (math in attention_patches/shared_attention.py).

What the patch puts on the node's own clone, all removed with it:
- the StyleAligned technique on the attention router (attn1 of the selected layers);
- a DIFFUSION_MODEL wrapper that, per UNet forward, reads the batch layout to zero the
  reference's ControlNet residuals and to tell shared GroupNorms which rows share;
- with share_group_norm, object patches of each GroupNorm's `forward` (applied by
  ComfyUI only while this clone is loaded; the module, its weights and any LoRA
  patch on them stay as they are).

Defaults are the paper's. On a small model they erase the other images' subjects,
which is why examples/style_aligned_from_photo.json (the 128 px demo model) departs
from the paper's transfer settings. benchmarks/quality.py, StyleAligned from a photo,
36 images (kept own object / photo's background pattern, unpatched batch in brackets):
paper's settings at CFG 10: 0.56 (0.86) / 0.69 (0.11); at CFG 5: 0.47 (0.94) / 0.92
(0.19); the example's: 0.86 (0.94) / 0.69 (0.19). Why:
- At a 16×16 latent (attention at 16², 8², 4², 2²) the reference's tokens are its
  whole content, object and background, so every reference "leaks content". The
  paper's own answer to leaking content is shared_score_scale 0.5 with shift 0, in
  place of its ln 2 doubling of the reference.
- share_group_norm: a GroupNorm group of the demo UNet holds 16 to 512 values (SD1.5
  at 512²: 2,560 to 40,960), so joint statistics with the reference are largely its
  content, and they normalise the target's object away: off.
- CFG 5, the demo model's own (at the paper's 10 the unpatched batch already loses
  subjects), and the reference a tenth of the schedule ahead as in the paper (offset
  5 of 50 steps there, 2 of 20 here).
Skipping the 4² and 2² layers changed nothing measurable, so every layer still shares.
"""

from __future__ import annotations

import logging
import math

import torch

import comfy.patcher_extension
from comfy_api.latest import io

from ..attention_patches.call import ChunkLayout, StepClock
from ..attention_patches.shared_attention import StyleAlignedOptions, shared_attention_extra_bytes
from ..attention_patches.style_aligned import (
    SharedGroupNormForward,
    SharedNormState,
    StyleAligned,
    StyleAlignedSettings,
    call_progress,
    parse_blocks,
    parse_image_list,
    zero_reference_control,
)
from ..attention_patches.style_reference import ReferenceTrajectory
from .inversion import INVERSION, check_inversion, check_inverted_size
from .patching import attach_router, model_family, router_family, router_of
from .style_aligned_dit import DIT_BLOCK_CHOICES, apply_dit_style_aligned, check_dit_inputs

log = logging.getLogger("attention_lab")

NODE = "SharedAttentionStyleAlign"
PHOTO_NODE = "StyleAlignedReferenceFromInversion"
WRAPPER_KEY = "attention_lab.style_aligned"
PHOTO_WRAPPER_KEY = "attention_lab.style_aligned.reference"
RUN_WRAPPER_KEY = "attention_lab.style_aligned.run"
PHOTO_RUN_WRAPPER_KEY = "attention_lab.style_aligned.reference.run"
GROUP_NORM_MODES = ["auto", "on", "off"]
BLOCK_CHOICES = ["all", "input", "middle", "output", "input,output", "middle,output", "input,middle"]
_BLOCK_OF_MODULE = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output", "out": "output"}


class StyleAlignedForward:
    """DIFFUSION_MODEL wrapper: the per-forward part of the patch that attention calls cannot do."""

    def __init__(self, technique: StyleAligned, norm_state: SharedNormState | None, reference_control: bool):
        self.technique = technique
        self.norm_state = norm_state
        self.reference_control = reference_control
        self.clock = StepClock()

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        layout = ChunkLayout.of(x.shape[0], transformer_options.get("cond_or_uncond"))
        if layout.images > 1:
            groups = self.technique.settings.groups(layout)
            if not self.reference_control:
                control = zero_reference_control(control, groups, x.shape[0])
            if self.norm_state is not None and self.technique.active(layout, call_progress(self.clock, transformer_options)):
                self.norm_state.groups = groups
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            if self.norm_state is not None:
                self.norm_state.groups = None

    def __deepcopy__(self, memo):
        return self  # shared by clones, like the technique it serves


def self_attention_sizes(diffusion_model, height: int, width: int) -> dict[tuple, tuple[int, int]]:
    """(tokens, channels) of each UNet block's self-attention for a latent of height×width.

    Keyed by (block, block id) as ComfyUI's replace patches name layers; the level of a
    block follows the Downsample/Upsample modules of the blocks before it.
    """
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    sizes = {}

    def record(key, block, level):
        for module in block.modules():
            if isinstance(module, SpatialTransformer):
                h, w = -(-height // 2**level), -(-width // 2**level)
                sizes[key] = (h * w, module.transformer_blocks[0].attn1.to_q.out_features)

    level = 0
    for i, block in enumerate(getattr(diffusion_model, "input_blocks", [])):
        record(("input", i), block, level)
        level += any(isinstance(m, Downsample) for m in block.modules())
    if getattr(diffusion_model, "middle_block", None) is not None:
        record(("middle", 0), diffusion_model.middle_block, level)
    for i, block in enumerate(getattr(diffusion_model, "output_blocks", [])):
        record(("output", i), block, level)
        level -= any(isinstance(m, Upsample) for m in block.modules())
    return sizes


def patch_extra_bytes(model, technique: StyleAligned, group_norm: bool, images: int, height: int, width: int) -> int:
    """What the patch needs beyond unpatched sampling, at its largest shared layer, for a CFG batch of `images`."""
    settings = technique.settings
    sizes = self_attention_sizes(model.model.diffusion_model, height, width)
    shared = [sizes[(layer[0], layer[1])] for layer in technique.layers if (layer[0], layer[1]) in sizes]
    if not shared:
        return 0
    rows = 2 * images  # cond and uncond in one call, as ComfyUI runs CFG when memory allows
    sharing = images - 1 if settings.share_with is None else len(set(settings.share_with) - {settings.reference_index})
    itemsize = torch.empty((), dtype=model.model_dtype()).element_size()
    return max(shared_attention_extra_bytes(rows, 2 * sharing, tokens, channels, itemsize, settings.attention,
                                            group_norm) for tokens, channels in shared)


class StyleAlignedRun:
    """OUTER_SAMPLE wrapper: checks the latent batch against the settings before the first UNet call.

    The node sees only the MODEL; the batch it will be used with is known when sampling
    starts, so a wrong reference_index or share_with, or a batch whose shared attention
    would not fit in memory, is refused here, before the model is loaded or any step
    runs, and a batch with nothing to share is reported.
    """

    def __init__(self, technique: StyleAligned, group_norm: bool):
        self.technique = technique
        self.group_norm = group_norm

    def __call__(self, executor, noise, *args, **kwargs):
        images = noise.shape[0]
        if images == 1:
            log.warning(
                "%s: the latent batch has 1 image, so no image can take the reference's style and this run "
                "samples as without the node; use a latent batch_size of 2 or more (image %d is the reference)",
                NODE, self.technique.settings.reference_index)
        else:
            self.technique.settings.groups(ChunkLayout.of(images, None))  # raises, naming the input
            self.check_memory(executor.class_obj.model_patcher, images, noise.shape[-2], noise.shape[-1])
        return executor(noise, *args, **kwargs)

    def extra_bytes(self, model, images: int, height: int, width: int) -> int:
        return patch_extra_bytes(model, self.technique, self.group_norm, images, height, width)

    def check_memory(self, model, images: int, height: int, width: int):
        import comfy.model_management

        needed = self.extra_bytes(model, images, height, width)
        free = comfy.model_management.get_free_memory(model.load_device)
        if needed <= free:
            return
        low, high = 1, images  # the largest batch that fits lies in [low, high)
        while high - low > 1:
            middle = (low + high) // 2
            if self.extra_bytes(model, middle, height, width) <= free:
                low = middle
            else:
                high = middle
        fits = low
        advice = (f"at most {fits} images fit: lower the latent batch_size to {fits}" if fits > 1 else
                  "not even 2 images fit: free memory or sample a smaller latent")
        raise ValueError(
            f"{NODE}: a latent batch of {images} images would need about {needed / 2**30:.1f} GiB more than unpatched "
            f"sampling for the shared attention, and {free / 2**30:.1f} GiB are free on {model.load_device}; {advice}"
            + (" (or turn full_attention_share off: it attends over every image's tokens at once)"
               if self.technique.settings.attention.full_attention_share else "")
        )

    def __deepcopy__(self, memo):
        return self


def group_norm_paths(model, blocks: frozenset[str]) -> list[str]:
    """Object-patch paths of the UNet's GroupNorm modules inside the selected blocks."""
    paths = []
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.GroupNorm) and _BLOCK_OF_MODULE.get(name.split(".")[0]) in blocks:
            paths.append(f"diffusion_model.{name}")
    return paths


def share_group_norms(model, blocks: frozenset[str], state: SharedNormState) -> int:
    """Object-patch every selected GroupNorm's forward on `model` (a clone) to share statistics."""
    paths = group_norm_paths(model, blocks)
    for path in paths:
        current = model.get_model_object(f"{path}.forward")  # another node's patch, or the module's own
        if isinstance(current, SharedGroupNormForward):  # an earlier StyleAlign on this model: replace it
            current = current.forward
        model.add_object_patch(f"{path}.forward", SharedGroupNormForward(current, state))
    return len(paths)


def apply_style_aligned(model, settings: StyleAlignedSettings, share_group_norm: bool, reference_control: bool):
    """The patched clone. Applying the node again on its output replaces the earlier settings."""
    patched = model.clone()
    router = attach_router(patched, node=NODE)
    for earlier in [t for t in router.techniques if isinstance(t, StyleAligned)]:
        router.remove(earlier)
    technique = router.add(StyleAligned(settings, router.layers))
    norm_state = SharedNormState() if share_group_norm else None
    if norm_state is not None:
        share_group_norms(patched, settings.blocks, norm_state)
    wrappers = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    patched.remove_wrappers_with_key(wrappers, WRAPPER_KEY)
    patched.add_wrapper_with_key(wrappers, WRAPPER_KEY, StyleAlignedForward(technique, norm_state, reference_control))
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    patched.remove_wrappers_with_key(outer, RUN_WRAPPER_KEY)
    patched.add_wrapper_with_key(outer, RUN_WRAPPER_KEY, StyleAlignedRun(technique, share_group_norm))
    return patched


def resolve_group_norm(mode: str, model) -> bool:
    """"auto" is the paper's choice per family: off for SDXL (its SDXL demos), on for SD1.x/SD2.x."""
    if mode not in GROUP_NORM_MODES:
        raise ValueError(f"share_group_norm: expected one of {GROUP_NORM_MODES}, got {mode!r}")
    if mode == "auto":
        return not model_family(model).startswith("SDXL")
    return mode == "on"


class SharedAttentionStyleAlign(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE,
            display_name="Shared Attention Style Align (StyleAligned)",
            category="attention_lab/style",
            description=(
                "StyleAligned (Hertz et al., CVPR 2024): every image of the batch also attends to a reference "
                "image's self-attention keys and values, after AdaIN of its queries and keys to the reference's "
                "statistics, so the whole batch takes the reference's style. Use one latent batch with one prompt "
                "per image (e.g. '<object>, <style>'). Patches a clone of MODEL; bypass the node to undo it."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x, SD2.x, SDXL, Flux or SD3 model to patch (a clone is "
                                                "patched)."),
                io.Int.Input(
                    "reference_index", default=0, min=0, max=4095,
                    tooltip="Which image of the latent batch is the style reference (0 = the first). The "
                            "reference is generated as it would be without the patch; the others share its style.",
                ),
                io.String.Input(
                    "share_with", default="all",
                    tooltip="Which images take the reference's style: 'all' (every other image), or image "
                            "indices such as '1, 3' or '[1, 3]'. Images not listed are generated unpatched.",
                ),
                io.Float.Input(
                    "shared_score_scale", default=1.0, min=0.0, max=10.0, step=0.01,
                    tooltip="Multiplies the reference's keys for the other images: a temperature on how sharply "
                            "they attend to the reference. 1 = the paper's default; 0.5 (with shift 0) weakens "
                            "content leaking from the reference (the paper: very famous images; small models, "
                            "whose few attention tokens are all content).",
                ),
                io.Float.Input(
                    "shared_score_shift", default=0.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="Added to the attention logits of the reference's tokens: ln 2 ≈ 0.69 doubles the "
                            "weight of the reference (the paper's setting for style from a real image). "
                            "0 = the paper's default.",
                ),
                io.Boolean.Input(
                    "adain_queries", default=True,
                    tooltip="AdaIN the queries of each image to the reference's mean and std (per head and "
                            "channel, over tokens). On in the paper; off together with adain_keys is its "
                            "'without AdaIN' ablation (weaker style).",
                ),
                io.Boolean.Input(
                    "adain_keys", default=True,
                    tooltip="AdaIN the keys of each image to the reference's statistics. On in the paper.",
                ),
                io.Boolean.Input(
                    "adain_values", default=False,
                    tooltip="Also AdaIN the values. Off in the paper.",
                ),
                io.Combo.Input(
                    "share_group_norm", options=GROUP_NORM_MODES, default="auto",
                    tooltip="Normalise each image's GroupNorm layers with statistics over its features and the "
                            "reference's together. 'auto' is the paper's choice: off for SDXL, on for SD1.x/SD2.x. "
                            "Turn it off if the other images lose their subjects: at low resolution a group holds "
                            "few values and the joint statistics carry the reference's content. "
                            "(The paper's share_layer_norm is not offered: LayerNorm is per token, so sharing "
                            "it changes nothing.)",
                ),
                io.Boolean.Input(
                    "full_attention_share", default=False,
                    tooltip="The paper's ablation: all sharing images attend to each other's tokens (no AdaIN, "
                            "no reference priority). More uniform sets, less prompt fidelity; it changes the "
                            "reference too. Off in the paper's method.",
                ),
                io.Float.Input(
                    "only_self_level", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Fraction of self-attention layers that fall back to plain attention, spread evenly "
                            "(every k-th layer in the paper's layer order). 0 = every layer shares (the paper's "
                            "default); 1 = none.",
                ),
                io.Combo.Input(
                    "blocks", options=BLOCK_CHOICES, default="all",
                    tooltip="UNet blocks whose self-attention (and GroupNorm, when shared) is shared: 'all' as "
                            "in the paper, or only the encoder (input), middle or decoder (output) blocks. UNet "
                            "models; on Flux and SD3 leave it at 'all' and use dit_blocks.",
                ),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="First part of the schedule where sharing is on (0 = from the first step).",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Sharing stops at this fraction of the schedule (1 = to the last step, as in the paper).",
                ),
                io.Boolean.Input(
                    "reference_gets_control", default=False,
                    tooltip="Off (the paper): the reference image gets no ControlNet / T2I-Adapter residuals, so it "
                            "keeps its own layout while the other images follow the control. On: the reference "
                            "keeps the control ComfyUI computed for it (e.g. a hint batch with its own hint).",
                ),
                io.Combo.Input(
                    "dit_blocks", options=DIT_BLOCK_CHOICES, default="auto", optional=True,
                    tooltip="Flux and SD3 only: which transformer blocks share. 'auto': on Flux the single-stream "
                            "blocks, as the Flux StyleAligned implementations do; on SD3 every joint block (it has "
                            "no others). 'single', 'double' or 'all' choose explicitly. only_self_level and the "
                            "step range apply within them.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with StyleAligned shared attention.")],
        )

    @classmethod
    def execute(cls, model, reference_index, share_with, shared_score_scale, shared_score_shift, adain_queries,
                adain_keys, adain_values, share_group_norm, full_attention_share, only_self_level, blocks,
                start_percent, end_percent, reference_gets_control, dit_blocks="auto") -> io.NodeOutput:
        family = router_family(model)
        if family in ("flux", "sd3"):
            check_dit_inputs(family, blocks, share_group_norm)
            blocks = "all"
        settings = StyleAlignedSettings(
            reference_index=reference_index,
            share_with=parse_image_list(share_with, "share_with"),
            attention=StyleAlignedOptions(
                adain_queries=adain_queries, adain_keys=adain_keys, adain_values=adain_values,
                shared_score_scale=shared_score_scale, shared_score_shift=shared_score_shift,
                full_attention_share=full_attention_share,
            ),
            only_self_level=only_self_level,
            blocks=parse_blocks(blocks),
            start_percent=start_percent,
            end_percent=end_percent,
        )
        if family in ("flux", "sd3"):
            return io.NodeOutput(apply_dit_style_aligned(model, family, settings, dit_blocks, only_self_level,
                                                         reference_gets_control))
        patched = apply_style_aligned(model, settings, resolve_group_norm(share_group_norm, model),
                                      reference_gets_control)
        return io.NodeOutput(patched)


# -- style from a real image ----------------------------------------------------------


def with_rows(context: torch.Tensor, rows: list[int], reference: torch.Tensor) -> torch.Tensor:
    """A copy of the cross-attention context with `rows` set to the reference prompt's.

    Prompts of different token lengths are repeated to their least common multiple,
    as ComfyUI batches conds (repeating all tokens leaves cross-attention unchanged).
    """
    tokens = math.lcm(context.shape[1], reference.shape[1])
    context = context.repeat(1, tokens // context.shape[1], 1)  # a copy, also when the length stays
    context[rows] = reference.repeat(1, tokens // reference.shape[1], 1).to(context)
    return context


class ReferenceFromTrajectory:
    """APPLY_MODEL wrapper: the reference rows are the inverted photo at this sigma, with the photo's prompt."""

    def __init__(self, reference_index: int, trajectory: ReferenceTrajectory, context: torch.Tensor,
                 adm: torch.Tensor | None):
        self.reference_index = reference_index
        self.trajectory = trajectory
        self.context = context
        self.adm = adm

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        layout = ChunkLayout.of(x.shape[0], transformer_options.get("cond_or_uncond"))
        if layout.images > 1:
            reference = self.reference_index
            latent = self.trajectory.latent_at(float(t.reshape(-1)[0]))
            check_inverted_size(latent.shape[1:], x.shape[1:], PHOTO_NODE)
            x = x.clone()
            x[[layout.row(c, reference) for c in range(len(layout.cond_or_uncond))]] = latent.to(x)
            cond_rows = [layout.row(c, reference) for c in layout.chunks(cond=True)]
            if cond_rows and c_crossattn is not None:
                c_crossattn = with_rows(c_crossattn, cond_rows, self.context)
            if cond_rows and self.adm is not None and kwargs.get("y") is not None:
                y = kwargs["y"].clone()
                y[cond_rows] = self.adm.to(y)
                kwargs["y"] = y
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def __deepcopy__(self, memo):
        return self


class ReferenceRun:
    """OUTER_SAMPLE wrapper: the latent batch must match the inverted photo, checked before the first UNet call."""

    def __init__(self, trajectory: ReferenceTrajectory):
        self.trajectory = trajectory

    def __call__(self, executor, noise, *args, **kwargs):
        check_inverted_size(self.trajectory.latents.shape[1:], noise.shape[1:], PHOTO_NODE)
        if noise.shape[0] == 1:
            log.warning(
                "%s: the latent batch has 1 image, so it is the reference (the photo's reconstruction) and no image "
                "takes the photo's style; use a latent batch_size of 2 or more", PHOTO_NODE)
        return executor(noise, *args, **kwargs)

    def __deepcopy__(self, memo):
        return self


def reference_index_of(model) -> int:
    router = router_of(model)
    techniques = [t for t in (router.techniques if router else []) if isinstance(t, StyleAligned)]
    if not techniques:
        raise ValueError(
            f"{PHOTO_NODE}: model: connect a MODEL patched by SharedAttentionStyleAlign (it says which image of the "
            "batch is the reference and how the others share its style)"
        )
    return techniques[-1].settings.reference_index


def reference_conditioning(model, conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The photo prompt's cross-attention context and (SDXL) ADM vector, as the model's conds build them."""
    if not conditioning:
        raise ValueError(f"{PHOTO_NODE}: reference_positive: expected a conditioning (the photo's prompt)")
    cond, extra = conditioning[0][0], dict(conditioning[0][1])
    if cond.shape[0] != 1:
        raise ValueError(f"{PHOTO_NODE}: reference_positive: expected one prompt (batch 1), got a batch of {cond.shape[0]}")
    extra.pop("cross_attn", None)
    conds = model.model.extra_conds(cross_attn=cond, **extra)
    adm = conds.get("y")
    return conds["c_crossattn"].cond, None if adm is None else adm.cond


def apply_reference_from_inversion(model, inversion, reference_positive, offset: int):
    family = router_family(model)
    if family in ("flux", "sd3"):
        raise ValueError(f"{PHOTO_NODE}: model: the model is {model_family(model)}; style from a photo supports "
                         "SD1.x, SD2.x and SDXL models (on Flux and SD3, SharedAttentionStyleAlign styles a batch "
                         "after its first image)")
    check_inversion(inversion, model, PHOTO_NODE)
    if inversion.latents.shape[1] != 1:
        raise ValueError(f"{PHOTO_NODE}: inversion: expected the inversion of one image, got a batch of "
                         f"{inversion.latents.shape[1]}")
    reference = reference_index_of(model)
    order = torch.argsort(inversion.sigmas, descending=True)  # sampling order, whatever the inversion's
    trajectory = ReferenceTrajectory(inversion.latents[order][:, 0], inversion.sigmas[order], offset)
    context, adm = reference_conditioning(model, reference_positive)
    patched = model.clone()
    wrappers = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    patched.remove_wrappers_with_key(wrappers, PHOTO_WRAPPER_KEY)
    patched.add_wrapper_with_key(wrappers, PHOTO_WRAPPER_KEY, ReferenceFromTrajectory(reference, trajectory, context, adm))
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    patched.remove_wrappers_with_key(outer, PHOTO_RUN_WRAPPER_KEY)
    patched.add_wrapper_with_key(outer, PHOTO_RUN_WRAPPER_KEY, ReferenceRun(trajectory))
    return patched


class StyleAlignedReferenceFromInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=PHOTO_NODE,
            display_name="StyleAligned Reference From Inversion (photo style)",
            category="attention_lab/style",
            description=(
                "Style from a real image (the paper's transfer notebook): the batch's reference image follows the "
                "DDIM inversion of your photo at every step, with the photo's own prompt, so the other images "
                "take the photo's style in one KSampler pass. Connect a MODEL patched by "
                "SharedAttentionStyleAlign (paper: shared_score_shift 0.69, share_group_norm on), an INVERSION "
                "from DDIMInvert (paper: cfg 2, 50 steps) and sample with the same steps and scheduler "
                "(paper: cfg 10). The reference image of the output is the model's reconstruction of the photo. "
                "If the other images lose their subjects (small models and low resolutions, e.g. the 128 px demo "
                "model, where the photo's few tokens are all content): shared_score_scale 0.5 with shift 0 (the "
                "paper's setting for a reference whose content leaks), share_group_norm off, and the model's usual "
                "CFG, as examples/style_aligned_from_photo.json does."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A MODEL patched by SharedAttentionStyleAlign (a clone is patched)."),
                INVERSION.Input("inversion", tooltip="DDIMInvert's inversion of the reference photo (one image)."),
                io.Conditioning.Input(
                    "reference_positive",
                    tooltip="The photo's prompt, as used for the inversion (e.g. 'a man lying in a bed, medieval "
                            "painting'). The reference row uses it; the other images use the KSampler's prompt.",
                ),
                io.Int.Input(
                    "offset", default=5, min=0, max=999,
                    tooltip="How many inversion steps below the noisiest latent the reference starts (paper: 5 of "
                            "50 steps, a tenth of the schedule; 2 of 20): its structure is then present from the "
                            "first step. Step i ≥ 1 uses the inverted latent of step max(offset + 1, i).",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model whose reference image follows the photo's inversion.")],
        )

    @classmethod
    def execute(cls, model, inversion, reference_positive, offset) -> io.NodeOutput:
        return io.NodeOutput(apply_reference_from_inversion(model, inversion, reference_positive, offset))
