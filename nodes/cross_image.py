"""CrossImageAttention: zero-shot appearance transfer from two inverted images (docs/methods.md §2).

The math is attention_patches/cross_image.py. This adapter runs the transfer as
one ComfyUI sampling run (`CFGGuider.sample` with a KSAMPLER), so conditioning
processing, ControlNet on the output branch, model patches, model loading and
the progress bar are ComfyUI's own. It is shaped like ComfyUI's PerpNeg guider:

- one guider (`CrossImageGuider`, a `CFGGuider` whose `predict_noise` is the
  documented extension point) holds the transfer's state and, at a swap step,
  runs a *source* UNet call on the appearance (or structure) latent of that
  step, read from its inversion, whose swap layers store their keys and values
  in the step's pass record, then the *output* call(s) that use them, and
  blends the swap and no-swap predictions (swap guidance);
- its sampler (`sample_cross_image`) replays the structure image's inversion
  from the first denoising step (edit-friendly DDPM: its noise maps), calling
  the guider's masked AdaIN between steps.

Both count steps the same way: the position of σ in the denoising schedule.
The appearance and structure branches are never denoised: their trajectories
are their inversions, so they reconstruct their images exactly and cost one
UNet call per swap step (the appearance's) plus one at a few steps (the
structure's), never the authors' two full passes of three branches.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import comfy.model_management
import comfy.samplers
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..attention_patches import cross_image as ci
from ..attention_patches.recorder import CROSS, SELF, AttentionRecorder, RecordSelection
from ..attention_patches.schedule import step_index
from ..attention_patches.segmentation import select_words
from ..inversion import Inversion, ddpm_replay
from ..inversion._common import vp_scale
from .inversion import INVERSION, SamplerModel, check_inversion, check_invertible, guided_sample
from .patching import attach_router, decoder_levels
from .tokens import prompt_words

NODE = "CrossImageAttention"
RECORD_KEY = "attention_lab.cross_image.record"
VAE_SCALE = 8
log = logging.getLogger("attention_lab")


# --- the transfer's settings, by name ---------------------------------------------------------


@dataclass(frozen=True)
class CrossImageSettings:
    """The node's inputs that shape the transfer; defaults are the authors'. The object words are
    checked against the prompt on construction (the rest once the inversions' step count is known)."""

    structure_object: str
    appearance_object: str
    prompt: str = "A photo of a {}"
    skip: float = ci.SKIP
    contrast: float = ci.CONTRAST
    swap_guidance: float = ci.SWAP_GUIDANCE
    swap_start: float = ci.SWAP_START
    swap_end: float = 1.0
    structure_every: int = ci.STRUCTURE_EVERY
    structure_end: float = ci.STRUCTURE_END
    masked_adain: bool = True
    adain_background: bool = False
    adain_start: float = ci.ADAIN_START
    segments: int = ci.SEGMENTS
    cfg: float = 1.0
    authors_step_counter: bool = True

    def __post_init__(self):
        errors = prompt_word_errors(self.prompt, self.structure_object, self.appearance_object)
        if errors:
            raise ValueError(f"{NODE}: {errors[0]}")

    def skipped_steps(self, steps: int) -> int:
        """How many of an inversion's `steps` the transfer skips; at least one is left to denoise."""
        skipped = int(math.floor(self.skip * steps + 0.5))
        if not 0 <= skipped < steps:
            raise ValueError(f"{NODE}: skip: {self.skip} of {steps} steps leaves no step to denoise; lower it")
        return skipped

    def plan(self, denoising_steps: int) -> ci.CrossImageSchedule:
        return ci.CrossImageSchedule(
            steps=denoising_steps, swap_start=self.swap_start, swap_end=self.swap_end,
            structure_every=self.structure_every, structure_end=self.structure_end, guidance=self.swap_guidance,
            adain=self.masked_adain, adain_start=self.adain_start,
            attention_lag=1 if self.authors_step_counter else 0,
        )


# --- the guider: the transfer's state and every UNet call of a step --------------------------


def with_options(model_options: dict, **entries) -> dict:
    """A copy of `model_options` whose transformer_options carry `entries` (the calls' pass records)."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), **entries}
    return options


class CrossImageGuider(comfy.samplers.CFGGuider):
    """The transfer as one ComfyUI guider, shaped like ComfyUI's PerpNeg guider: `predict_noise` makes
    every UNet call of a step.

    It holds the transfer's whole state: the structure and appearance trajectories from the first
    denoising step on (`Inversion.from_step`), the step plan, the attention technique and recorder,
    and the object masks once made. Steps have one index, 0 … plan.steps − 1 after the skipped ones:
    the position of a call's σ in `sigmas`, the schedule the sampler walks (`step_index`), which is
    also the replay's step and the index into both trajectories. At a swap step `predict_noise` runs
    a *source* call on the appearance (or structure) latent of that step, whose swap layers store
    their keys and values in the step's `CrossImagePass`, then the *output* call(s) that read them,
    and blends the swap and no-swap predictions (swap guidance). At the AdaIN step it first records
    both branches' attention for the object masks.
    """

    def __init__(self, model_patcher, structure: Inversion, appearance: Inversion, skipped_steps: int,
                 plan: ci.CrossImageSchedule, recorder: AttentionRecorder, object_tokens: dict, segments: int,
                 adain_background: bool = False):
        super().__init__(model_patcher)
        self.skipped_steps = skipped_steps
        self.trajectories = {ci.STRUCTURE: structure.from_step(skipped_steps),
                             ci.APPEARANCE: appearance.from_step(skipped_steps)}
        self.sigmas = self.trajectories[ci.STRUCTURE].sampling_sigmas
        self.plan = plan
        self.recorder = recorder
        self.object_tokens = object_tokens  # branch -> token positions of each scored noun, the branch's object first
        self.segments = segments
        self.adain_background = adain_background
        self.masks: dict | None = None  # branch -> [images, h, w] at latent size, once recorded
        self.mask_notes: list[str] = []

    def step_at(self, sigma) -> int:
        """The denoising step of a model call at `sigma` (a float, or ComfyUI's `timestep`)."""
        return step_index(self.sigmas, sigma)

    def latent(self, branch: str, step: int, device) -> torch.Tensor:
        """A branch's latent at a denoising step, from its inversion: the branch's exact trajectory.

        After the last step (σ = 0) that is where a replay without the final residual ends,
        x̂0 = x0 − final_residual (as the authors' branches end), not the image's own latent.
        """
        trajectory = self.trajectories[branch]
        latent = trajectory.latents[step]  # a ddpm trajectory is stored in sampling order
        if step == trajectory.num_steps and trajectory.final_residual is not None:
            latent = latent - trajectory.final_residual
        return latent.to(device)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self.step_at(timestep)
        plan = self.plan
        if step == plan.adain_step and self.masks is None:
            self.masks = {branch: self.object_masks(branch, step, timestep, model_options)
                          for branch in (ci.STRUCTURE, ci.APPEARANCE)}
        if not plan.swaps(step):
            return super().predict_noise(x, timestep, model_options, seed)
        source = ci.CrossImagePass(ci.SOURCE)
        self.source_call(plan.source(step), step, timestep, with_options(model_options, **{ci.PASS_KEY: source}))
        output = with_options(model_options, **{ci.PASS_KEY: ci.CrossImagePass.output_of(source, swap_conds=(0,))})
        positive = self.conds.get("positive")
        if not math.isclose(self.cfg, 1.0):
            # the authors' text CFG: swapped conditional, unswapped unconditional prediction
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                    positive, self.cfg, model_options=output, seed=seed)
        scale = plan.guidance_scale(step)
        if scale is None:
            return comfy.samplers.calc_cond_batch(self.inner_model, [positive], x, timestep, output)[0]
        swap, no_swap = comfy.samplers.calc_cond_batch(self.inner_model, [positive, positive], x, timestep, output)
        return ci.swap_guided(no_swap, swap, scale)

    def source_call(self, branch: str, step: int, timestep, model_options) -> None:
        x = self.latent(branch, step, timestep.device)
        comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[branch]], x, timestep[:1].expand(x.shape[0]),
                                       model_options)

    def object_masks(self, branch: str, step: int, timestep, model_options) -> torch.Tensor:
        """The branch's object masks `[images, h, w]` at latent size, from its attention at `step`."""
        x = self.latent(branch, step, timestep.device)
        recorder = self.recorder
        recorder.begin_run()
        comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[branch]], x, timestep[:1].expand(x.shape[0]),
                                       with_options(model_options, **{RECORD_KEY: True}))
        self_grid = recorder.grids(SELF)[0]
        cross_grid = min(recorder.grids(CROSS), key=lambda g: g[0] * g[1])
        self_maps, cross_maps = recorder.mean(SELF, self_grid), recorder.mean(CROSS, cross_grid)
        nouns = self.object_tokens[branch]
        masks = []
        for i in range(self_maps.shape[0]):
            noun_maps = [cross_maps[i][:, list(positions)].sum(-1).reshape(cross_grid) for positions in nouns]
            mask = ci.object_mask(self_maps[i], self_grid, noun_maps, self.segments, object_nouns=(0,))
            if not mask.any():
                self.mask_notes.append(f"{branch} image {i}: no segment scored as the object; AdaIN uses the whole latent")
                mask = torch.ones_like(mask)
            masks.append(F.interpolate(mask[None, None], size=tuple(x.shape[-2:]), mode="nearest")[0, 0])
        recorder.begin_run()  # the maps are not needed any more
        return torch.stack(masks)

    def after_step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """Masked AdaIN of the output latent after `step` (in the VP space the authors use)."""
        adain_step = self.plan.adain_step
        if adain_step is None or step < adain_step or self.masks is None:
            return x
        # the latents after `step` are at the next sigma (0 after the last step: the clean latents)
        scale = vp_scale(float(self.sigmas[step + 1]))
        style = self.latent(ci.APPEARANCE, step + 1, x.device) / scale
        content = x / scale
        out = []
        for i in range(x.shape[0]):
            s = style[i if style.shape[0] == x.shape[0] else 0]
            cm = self.masks[ci.STRUCTURE][i].to(x.device)
            sm = self.masks[ci.APPEARANCE][i if self.masks[ci.APPEARANCE].shape[0] == x.shape[0] else 0].to(x.device)
            moved = ci.masked_adain(content[i], s, cm, sm)
            if self.adain_background and (1 - cm).any() and (1 - sm).any():
                moved = ci.masked_adain(moved, s, 1 - cm, 1 - sm)
            out.append(moved)
        return torch.stack(out) * scale

    def transfer(self) -> torch.Tensor:
        """Run the transfer (conds and cfg set): the output LATENT tensor, in the user space."""
        sampler = comfy.samplers.KSAMPLER(sample_cross_image, {"guider": self})
        start = self.model_patcher.model.process_latent_out(self.latent(ci.STRUCTURE, 0, "cpu"))
        samples = guided_sample(self, sampler, self.sigmas, start, seed=0)
        for note in self.mask_notes:
            log.warning("[Attention Lab] %s: %s", NODE, note)
        return samples


def sample_cross_image(model, x, sigmas, extra_args=None, callback=None, disable=None,
                       guider: CrossImageGuider = None):
    """The KSAMPLER function of the output branch: the structure's DDPM replay, masked AdaIN between steps.

    A sampler of its own because no stock one does either: the output branch steps with the
    structure inversion's stored noise maps (edit-friendly DDPM), not fresh noise, so that without
    the swap it is the structure image exactly; and masked AdaIN changes the latent between two
    steps, which a guider, seeing model calls only, cannot. It holds no state: its steps are the
    indices of `sigmas`, the guider's own (`ddpm_replay` of the trajectory from the first
    denoising step), and the guider's `predict_noise` is its model.
    """
    calls = SamplerModel(model, extra_args, callback, len(sigmas) - 1, disable)
    check_invertible(*calls.sampling(), NODE)
    return ddpm_replay(calls, guider.trajectories[ci.STRUCTURE], calls.progress,
                       x_start=guider.latent(ci.STRUCTURE, 0, x.device), add_final_residual=False,
                       after_step=guider.after_step)


# --- checks and text ------------------------------------------------------------------------


def inverted_steps(inversion: Inversion) -> int:
    """The `steps` the inversion was asked for (a scheduler such as ddim_uniform may walk one more)."""
    return inversion.steps if inversion.steps is not None else inversion.num_steps


def check_inversions(model, structure, appearance) -> None:
    for name, value in (("structure", structure), ("appearance", appearance)):
        check_inversion(value, model, NODE, name, kind="ddpm")
    s, a = structure.sampling_sigmas, appearance.sampling_sigmas
    if s.shape != a.shape or not torch.allclose(s, a, rtol=1e-5, atol=1e-6):
        steps = (inverted_steps(appearance), inverted_steps(structure))
        schedule = (f"{steps[0]} steps against the structure's {steps[1]}" if steps[0] != steps[1]
                    else f"the same {steps[0]} steps, but other sigmas")
        raise ValueError(
            f"{NODE}: appearance: inverted over another schedule than the structure ({schedule}); invert both with "
            f"the same model, steps and scheduler"
        )
    batch, appearance_batch = structure.latents.shape[1], appearance.latents.shape[1]
    if appearance_batch not in (1, batch):
        raise ValueError(
            f"{NODE}: appearance: {appearance_batch} images for {batch} structure image(s); give 1 appearance image "
            f"(shared) or {batch} (one per structure image)"
        )
    if structure.latents.shape[-2:] != appearance.latents.shape[-2:]:
        # Supported (keys and values of any token count can be attended to), but not the authors' setting:
        # they resize both images to 512², so each swapped token has a counterpart at the same scale.
        log.warning("[Attention Lab] %s: appearance: its latent is %s, the structure's %s; the transfer runs, but "
                    "objects at another scale match less well (the authors use two images of one size)", NODE,
                    "x".join(map(str, appearance.latents.shape[-2:])), "x".join(map(str, structure.latents.shape[-2:])))


def prompt_word_errors(prompt: str, structure_object: str, appearance_object: str) -> list[str]:
    """What is wrong with the object words and the prompt, from the text alone (before any run)."""
    errors = []
    words = set(re.findall(r"\w+", prompt.lower()))
    for name, obj in (("structure_object", structure_object), ("appearance_object", appearance_object)):
        parts = re.findall(r"\w+", obj.lower())
        if not parts:
            errors.append(f"{name}: name the object in the {name.split('_')[0]} image (e.g. 'giraffe')")
        elif "{}" not in prompt and not all(part in words for part in parts):
            errors.append(f"{name}: {obj.strip()!r} is not in the prompt {prompt!r}; without {{}} the prompt is used "
                          f"for both images and must name both objects")
    return errors


def branch_prompt(template: str, obj: str, name: str) -> str:
    obj = obj.strip()
    if not obj:
        raise ValueError(f"{NODE}: {name}: name the object in the {name.split('_')[0]} image (e.g. 'giraffe')")
    return template.replace("{}", obj) if "{}" in template else template


def object_positions(clip, prompt: str, obj: str, name: str) -> tuple[int, ...]:
    words, _ = prompt_words(clip, prompt, NODE)
    try:
        return select_words(words, obj)[obj.strip().lower()]
    except ValueError as error:
        reason = str(error).removeprefix("words: ")
        raise ValueError(f"{NODE}: {name}: {reason} (prompt {prompt!r})") from error


def scored_nouns(clip, prompt: str, obj: str, other: str, name: str) -> list[tuple[int, ...]]:
    """Token positions of the nouns a branch's clusters are scored against: its object first, then the other
    branch's object when the prompt names it too. The authors score every noun nltk tags in the prompt;
    the pack has no tagger, so the nouns are the two object words."""
    nouns = [object_positions(clip, prompt, obj, name)]
    if other.strip().lower() != obj.strip().lower():
        words, _ = prompt_words(clip, prompt, NODE)
        try:
            nouns.append(select_words(words, other)[other.strip().lower()])
        except ValueError:
            pass  # the other object is not in this branch's prompt (the "{}" template): one noun
    return nouns


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def pixel_masks(masks: torch.Tensor | None, latent_shape) -> torch.Tensor:
    """Latent-size masks as a MASK at image size (zeros when no masks were made)."""
    if masks is None:
        return torch.zeros(latent_shape[0], latent_shape[-2] * VAE_SCALE, latent_shape[-1] * VAE_SCALE)
    # bilinear, then cut at 0.5: the outline follows the object between latent cells instead of their staircase
    smooth = F.interpolate(masks[:, None].float(), scale_factor=VAE_SCALE, mode="bilinear", align_corners=False)
    return (smooth[:, 0] > 0.5).float().cpu()


# --- the transfer ---------------------------------------------------------------------------


def transfer(model, clip, structure: Inversion, appearance: Inversion, settings: CrossImageSettings,
             output_conditioning=None) -> tuple[torch.Tensor, CrossImageGuider]:
    """The transferred LATENT tensor (user space) and the guider that ran it (its masks, its plan)."""
    check_inversions(model, structure, appearance)
    n = structure.num_steps
    skipped = settings.skipped_steps(n)
    try:
        plan = settings.plan(n - skipped)
        levels = decoder_levels(model, NODE)
        technique = ci.CrossImageAttention([layer for level in levels[:2] for layer in level], settings.contrast)
    except ValueError as error:
        raise ValueError(error if str(error).startswith(NODE) else f"{NODE}: {error}") from error
    # The authors cluster the last self-attention layer at the highest decoder resolution and label the
    # clusters from the last cross-attention layer at the next one. The pack averages every layer of those
    # two levels instead (as local-prompt-mixing's store does): one layer alone can be near-uniform on a small
    # model (the demo model's last 16² layer: entropy 5.48 of ln 256 = 5.55), and its clusters are noise.
    mask_layers = frozenset(levels[0] + levels[min(1, len(levels) - 1)])
    recorder = AttentionRecorder(RecordSelection(layers=mask_layers, max_tokens=None, only_with=RECORD_KEY))

    objects = {ci.STRUCTURE: settings.structure_object, ci.APPEARANCE: settings.appearance_object}
    prompts = {branch: branch_prompt(settings.prompt, obj, f"{branch}_object") for branch, obj in objects.items()}
    tokens = {}
    if settings.masked_adain:
        tokens = {b: scored_nouns(clip, prompts[b], objects[b], objects[other], f"{b}_object")
                  for b, other in ((ci.STRUCTURE, ci.APPEARANCE), (ci.APPEARANCE, ci.STRUCTURE))}

    patched = model.clone()
    router = attach_router(patched, NODE)
    router.add(technique)
    router.add(recorder)
    guider = CrossImageGuider(patched, structure, appearance, skipped, plan, recorder, tokens, settings.segments,
                              settings.adain_background)
    conds = {"positive": output_conditioning if output_conditioning is not None else encode(clip, prompts[ci.STRUCTURE]),
             ci.STRUCTURE: encode(clip, prompts[ci.STRUCTURE]), ci.APPEARANCE: encode(clip, prompts[ci.APPEARANCE])}
    if not math.isclose(settings.cfg, 1.0):
        conds["negative"] = encode(clip, "")
    guider.inner_set_conds(conds)
    guider.set_cfg(settings.cfg)
    return guider.transfer(), guider


# --- the node -------------------------------------------------------------------------------

FRACTION = dict(min=0.0, max=1.0, step=0.001, round=0.001)


class CrossImageAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE,
            display_name="Cross-Image Attention (Attention Lab)",
            category="attention_lab/editing",
            description=(
                "Zero-shot appearance transfer (Cross-Image Attention, Alaluf et al. 2024): the structure image's "
                "layout and shapes with the appearance image's colours and textures. Invert both images with "
                "DDIMInvert (method ddpm, cfg 3.5, the same steps and scheduler; the authors use 100 steps), then "
                "this node denoises the structure's trajectory while its decoder self-attention at the two highest "
                "resolutions takes keys and values from the appearance image. The images may differ in size: the "
                "output has the structure's size. SD1.x, SD2.x and SDXL."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model both images were inverted with."),
                io.Clip.Input("clip", tooltip="Encodes each branch's prompt and finds its object word's tokens."),
                INVERSION.Input("structure", tooltip="The structure image's INVERSION (DDIMInvert, method ddpm): the "
                                                     "output keeps its layout and shapes and has its size."),
                INVERSION.Input("appearance", tooltip="The appearance image's INVERSION, over the same schedule: "
                                                      "the output takes its colours and textures."),
                io.String.Input("structure_object", default="object",
                                tooltip="The object (domain word) in the structure image, e.g. 'giraffe': put into "
                                        "the prompt and used to find the object's mask for masked AdaIN."),
                io.String.Input("appearance_object", default="object",
                                tooltip="The object in the appearance image, e.g. 'zebra'."),
                io.String.Input("prompt", default="A photo of a {}",
                                tooltip="Each branch's prompt, {} replaced by its object (the authors' template). "
                                        "Without {} the text is used for both, and must contain both object words. "
                                        "Use the prompt the images were inverted with."),
                io.Float.Input("skip", default=ci.SKIP, **FRACTION,
                               tooltip="Share of the inversion's steps skipped: denoising starts from the structure's "
                                       "latent there (authors: 32 of 100). Higher keeps more of the structure image."),
                io.Float.Input("contrast", default=ci.CONTRAST, min=0.1, max=5.0, step=0.01,
                               tooltip="Attention contrast γ on the swapped map: clip((A − mean)·γ + mean, 0, 1). "
                                       "1 = plain swapped attention; the authors use 1.67 for sharper correspondences."),
                io.Float.Input("swap_guidance", default=ci.SWAP_GUIDANCE, min=1.0, max=20.0, step=0.1,
                               tooltip="Swap guidance λ: ε = ε_noswap + λ(ε_swap − ε_noswap), decaying linearly to "
                                       "max(λ/2, 1) over the steps; one extra UNet call per swap step. 1 = off. "
                                       "Used when cfg is 1 (the authors' text CFG is off)."),
                io.Float.Input("swap_start", default=round(ci.SWAP_START, 3), **FRACTION,
                               tooltip="Share of the denoising steps before the swap starts (authors: step 10 of 68)."),
                io.Float.Input("swap_end", default=1.0, **FRACTION,
                               tooltip="Share of the denoising steps after which the swap stops (authors: never)."),
                io.Int.Input("structure_every", default=ci.STRUCTURE_EVERY, min=0, max=100,
                             tooltip="Every this many swap steps (from swap_start), keys and values come from the "
                                     "structure image instead, until structure_end (the paper: steps 10, 15, …, 35; "
                                     "the authors' code, see authors_step_counter: 11, 16, …, 36). "
                                     "0 = always the appearance."),
                io.Float.Input("structure_end", default=round(ci.STRUCTURE_END, 3), **FRACTION,
                               tooltip="Share of the denoising steps after which the structure is no longer "
                                       "interleaved (authors: step 40 of 68)."),
                io.Boolean.Input("masked_adain", default=True,
                                 tooltip="After adain_start, match the output latent's per-channel statistics inside "
                                         "the structure object's mask to the appearance latent's inside its object's "
                                         "mask. Masks come from clustering self-attention, labelled by the object word."),
                io.Boolean.Input("adain_background", default=False,
                                 tooltip="Also match the background (outside the two masks) to the appearance's "
                                         "background. Off (authors): only the object is matched, the background "
                                         "takes the appearance through the swapped attention alone. Turn on for "
                                         "small models whose self-attention carries little colour (the demo model)."),
                io.Float.Input("adain_start", default=round(ci.ADAIN_START, 3), **FRACTION,
                               tooltip="Share of the denoising steps before masked AdaIN starts; the masks are taken "
                                       "from the attention at that step (authors: step 20 of 68)."),
                io.Int.Input("segments", default=ci.SEGMENTS, min=2, max=20,
                             tooltip="KMeans clusters of the self-attention used to find the objects (authors: 5)."),
                io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Text classifier-free guidance of the output. 1 (authors): off, swap guidance "
                                       "on. Above 1: ε_uncond(no swap) + cfg·(ε_cond(swap) − ε_uncond), no swap "
                                       "guidance."),
                io.Boolean.Input("authors_step_counter", default=True,
                                 tooltip="On (the authors' code, which made the paper's figures): the swap layers act "
                                         "one step late, as their attention reads a step counter set after each "
                                         "step: no swap at step 10, the structure's keys at 11, 16, …, 36. Off: the "
                                         "steps as the paper states them (10, 15, …, 35). Swap guidance and AdaIN "
                                         "use the step itself either way."),
                io.Conditioning.Input("output_conditioning", optional=True,
                                      tooltip="Replaces the output branch's prompt, e.g. the structure prompt through "
                                              "ControlNetApply: ControlNet then steers the output only."),
            ],
            outputs=[
                io.Latent.Output("latent", tooltip="The transferred image (structure's size); decode with VAEDecode."),
                io.Mask.Output("structure_mask", tooltip="The structure object's mask used by masked AdaIN "
                                                         "(zeros when masked AdaIN is off)."),
                io.Mask.Output("appearance_mask", tooltip="The appearance object's mask used by masked AdaIN."),
            ],
        )

    @classmethod
    def validate_inputs(cls, structure_object=None, appearance_object=None, prompt=None) -> bool | str:
        """The object words against the prompt, when ComfyUI validates the graph: before any node runs, so
        before the two inversions (a linked widget arrives as None and is checked when the node runs)."""
        if None in (structure_object, appearance_object, prompt):
            return True
        errors = prompt_word_errors(prompt, structure_object, appearance_object)
        return f"{NODE}: {errors[0]}" if errors else True

    @classmethod
    def execute(cls, model, clip, structure, appearance, structure_object, appearance_object, prompt, skip, contrast,
                swap_guidance, swap_start, swap_end, structure_every, structure_end, masked_adain, adain_background,
                adain_start, segments, cfg, authors_step_counter=True, output_conditioning=None) -> io.NodeOutput:
        settings = CrossImageSettings(
            structure_object=structure_object, appearance_object=appearance_object, prompt=prompt, skip=skip,
            contrast=contrast, swap_guidance=swap_guidance, swap_start=swap_start, swap_end=swap_end,
            structure_every=structure_every, structure_end=structure_end, masked_adain=masked_adain,
            adain_background=adain_background, adain_start=adain_start, segments=segments, cfg=cfg,
            authors_step_counter=authors_step_counter,
        )
        samples, guider = transfer(model, clip, structure, appearance, settings, output_conditioning)
        masks = guider.masks or {}
        return io.NodeOutput(
            {"samples": samples},
            pixel_masks(masks.get(ci.STRUCTURE), samples.shape),
            pixel_masks(masks.get(ci.APPEARANCE), appearance.latents.shape[1:]),
        )
