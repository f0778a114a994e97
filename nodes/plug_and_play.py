"""PlugAndPlay: translate a real image by text while keeping its structure (Tumanyan et al.).

The math is attention_patches/plug_and_play.py. This adapter samples every
translation prompt from the INVERSION's noise in the pack's source-branch batch
(nodes/source_branch.py, as Prompt-to-Prompt on a real image): per image the
rows `[guidance, translation_1, ...]`, the guidance row put back on the
inverted trajectory after every DDIM step, so at each step the UNet reads the
guidance branch at the inversion's own latent there (never re-denoised).

Patch points (documented ModelPatcher mechanisms only):
- self-attention queries and keys: the technique on the attention router;
- the feature block's residual branch: an object patch of that ResBlock's
  `out_layers` (the same modules, in the same order, plus a last layer that
  replaces the edit rows by the guidance rows), armed for each UNet call by an
  `output_block_patch` (the list patch that receives `transformer_options`
  as the block starts). ComfyUI's output-block patch alone cannot do it: it
  sees the block's inputs `(h, skip)`, not the residual branch inside the
  ResBlock, whose output the authors inject before the skip is added.

On the demo model (128² px, a 16² latent: the feature block's grid is 4², the injected
attention 4² and 8²) benchmarks/quality.py measures, over 8 rendered scenes, object-mask IoU
with the guidance 0.36 at the authors' cfg 7.5 and negative prompt (0.30 with nothing
injected) and 0.46 at cfg 5 with an empty negative (0.43 with nothing injected): the
injection keeps a little more structure, and the paper's guidance suits a 512² model, not
this one, whose vocabulary lacks the negative prompt's words. The example uses cfg 5 and
an empty negative; the node's defaults stay the authors'.
"""

from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.latest import io

from ..attention_patches import plug_and_play as pnp
from .inversion import INVERSION, check_inversion, check_invertible, guided_sample
from .patching import UnsupportedModelError, attach_router, block_downsampling, model_family, unet_layers
from .source_branch import (SourceBranchGuider, carry_extras, encode_group, positive_tooltip,
                            sample_ddim_tracking_source)

NODE = "PlugAndPlay"
NEGATIVE = "ugly, blurry, black, low res, unrealistic"  # the authors' pnp-config.yaml
FRACTION = dict(min=0.0, max=1.0, step=0.01)


def _error(name: str, message: str) -> ValueError:
    return ValueError(f"{NODE}: {name}: {message}")


def decoder_levels(model) -> list[tuple[int, int]]:
    """`(output block id, downsampling)` of every decoder block, in execution order."""
    unet = model.model.diffusion_model
    if getattr(unet, "input_blocks", None) is None or getattr(unet, "output_blocks", None) is None:
        raise UnsupportedModelError(f"{NODE}: model: {model_family(model)} has no UNet decoder; Plug-and-Play "
                                    "supports SD1.x, SD2.x and SDXL UNet models")
    return [(block, 2 ** down) for (kind, block), down in block_downsampling(model).items() if kind == "output"]


def feature_path(model, block: int) -> str:
    """Object-patch path of the residual branch (`out_layers`) of the feature block's ResBlock."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

    for index, module in enumerate(model.model.diffusion_model.output_blocks[block]):
        if isinstance(module, openaimodel.ResBlock):
            return f"diffusion_model.output_blocks.{block}.{index}.out_layers"
    raise UnsupportedModelError(f"{NODE}: model: output block {block} of {model_family(model)} has no ResBlock")


def apply_plug_and_play(model, group: int, feature_steps: float, attention_steps: float):
    """(patched clone, technique): the injections on a clone of `model`, for groups of `group` rows."""
    feature_block, attention_blocks = pnp.decoder_roles(decoder_levels(model))
    layers = [l for l in unet_layers(model, NODE) if l[0] == "output" and l[1] in attention_blocks]
    path = feature_path(model, feature_block)
    patched = model.clone()
    technique = pnp.PlugAndPlay(layers, group, feature_steps, attention_steps)
    attach_router(patched, NODE).add(technique)
    patched.set_model_output_block_patch(pnp.ArmFeatureBlock(technique, feature_block))
    branch = patched.get_model_object(path)  # the ResBlock's own, or another node's patch of it
    patched.add_object_patch(path, torch.nn.Sequential(*branch.children(), pnp.FeatureInjection(technique)))
    return patched, technique


def check_inputs(model, inversion, steps: int, feature_steps: float, attention_steps: float) -> None:
    """Every refusal before any model call (raises ValueError naming the input)."""
    check_invertible(model.get_model_object("model_sampling"), model_family(model), NODE)
    check_inversion(inversion, model, NODE, kind="ddim", steps=steps)
    for name, value in (("feature_injection", feature_steps), ("attention_injection", attention_steps)):
        if not 0.0 <= value <= 1.0:
            raise _error(name, f"{value} is not a fraction of the steps in [0, 1]")


def translate(model, clip, inversion, prompts: list[str], negative_prompt: str = NEGATIVE, cfg: float = 7.5,
              steps: int = 50, feature_steps: float = pnp.FEATURE_STEPS,
              attention_steps: float = pnp.ATTENTION_STEPS, guidance_prompt: str = "", positive=None) -> torch.Tensor:
    """The translations, a user-space LATENT tensor: per inverted image, one row per prompt, in order.

    `positive`'s extras (a ControlNet's control, ...) reach the guidance row and every translation's conditional
    row, so the features injected from the guidance branch carry the same control as the rows they enter.
    """
    if not prompts:
        raise _error("prompts", "is empty: give the translation prompt (one per line, e.g. 'a green circle on a "
                                "dotted yellow background')")
    # The guidance row has the guidance prompt in both CFG halves: the same tensors for both halves' edits.
    positive = carry_extras(encode_group(clip, [guidance_prompt] + prompts, NODE, "prompts"), positive, NODE)
    negative = encode_group(clip, [guidance_prompt] + [negative_prompt] * len(prompts), NODE, "negative_prompt")
    return translate_conditioned(model, inversion, positive, negative, len(prompts) + 1, cfg, steps, feature_steps,
                                 attention_steps)


def translate_conditioned(model, inversion, positive, negative, group: int, cfg: float, steps: int,
                          feature_steps: float, attention_steps: float) -> torch.Tensor:
    """`translate` from conditionings whose rows are `[guidance, translation_1, ...]` (`group` rows each)."""
    check_inputs(model, inversion, steps, feature_steps, attention_steps)
    patched, _ = apply_plug_and_play(model, group, feature_steps, attention_steps)
    guider = SourceBranchGuider(patched, group)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    sigmas = inversion.sampling_sigmas
    sampler = comfy.samplers.KSAMPLER(sample_ddim_tracking_source, {"inversion": inversion, "group": group,
                                                                    "track_source": True, "node": NODE})
    x_start = model.model.process_latent_out(inversion.latent_at(float(sigmas[0])))
    out = guided_sample(guider, sampler, sigmas, x_start, seed=0)
    return out.reshape(-1, group, *out.shape[1:])[:, 1:].reshape(-1, *out.shape[1:])


class PlugAndPlay(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE,
            display_name="Plug-and-Play Translate Image (Attention Lab)",
            category="attention_lab/editing",
            description=(
                "Plug-and-Play (Tumanyan et al.): translate a real image by a text prompt while keeping its "
                "structure. Invert the image with DDIMInvert (method ddim, an empty prompt, cfg 1, as the authors); "
                "each prompt is sampled from the inverted noise while the decoder's residual features and "
                "self-attention queries and keys come from the image's own inverted trajectory at the same step. "
                "SD1.x, SD2.x and SDXL (layers mapped by role)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the image was inverted with (LoRA and patches compose)."),
                io.Clip.Input("clip", tooltip="Encodes the prompts, the negative prompt and the guidance prompt."),
                INVERSION.Input("inversion", tooltip="From DDIMInvert with method ddim (the authors: an empty "
                                                     "prompt, cfg 1), with this node's step count."),
                io.String.Input("prompts", multiline=True, default="a green circle on a dotted yellow background",
                                tooltip="The translation prompt: what the image should show. One per line: "
                                        "each line is one more output image."),
                io.String.Input("negative_prompt", multiline=True, default=NEGATIVE,
                                tooltip=f"Negative prompt of the translations (the authors': '{NEGATIVE}'). "
                                        "Unused at cfg 1."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance of the translations (the authors: 7.5). Higher "
                                       "follows the prompt more and the image less."),
                io.Int.Input("steps", default=50, min=2, max=1000,
                             tooltip="DDIM steps (the authors: 50). Must equal the inversion's steps: the guidance "
                                     "branch is read from the inversion at every step."),
                io.Float.Input("feature_injection", default=pnp.FEATURE_STEPS, **FRACTION,
                               tooltip="τ_f: share of the steps, from the start, in which the decoder's residual "
                                       "features come from the image (the authors: 0.8). Higher keeps more "
                                       "structure; 0 turns it off."),
                io.Float.Input("attention_injection", default=pnp.ATTENTION_STEPS, **FRACTION,
                               tooltip="τ_A: share of the steps in which the decoder's self-attention queries and "
                                       "keys come from the image (the authors: 0.5). Higher keeps more layout; 0 "
                                       "turns it off."),
                io.String.Input("guidance_prompt", default="",
                                tooltip="The text of the guidance branch (the authors: empty, the prompt the image "
                                        "is inverted with). Leave empty unless you inverted with a prompt."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip=positive_tooltip("the guidance branch and every translation")),
            ],
            outputs=[io.Latent.Output(tooltip="The translations: per inverted image, one per prompt, in order.")],
        )

    @classmethod
    def execute(cls, model, clip, inversion, prompts, negative_prompt, cfg, steps, feature_injection,
                attention_injection, guidance_prompt, positive=None) -> io.NodeOutput:
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        return io.NodeOutput({"samples": translate(model, clip, inversion, lines, negative_prompt, cfg, steps,
                                                   feature_injection, attention_injection, guidance_prompt,
                                                   positive)})
