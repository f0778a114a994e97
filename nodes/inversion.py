"""DDIM / edit-friendly DDPM inversion inside ComfyUI's own sampling machinery.

The math is `inversion/` (plain torch). This module runs it as a ComfyUI sampler
(`comfy.samplers.KSAMPLER`) driven by `comfy.samplers.CFGGuider`, so conditioning
processing, model loading, every model patch (our router, other packs'),
`transformer_options["sample_sigmas"]` and the progress bar are the real ones,
and a patched MODEL (e.g. StyleAligned) changes a replay as it would change sampling.

Latent spaces: an `INVERSION` (the `inversion.Inversion` dataclass) holds the
trajectory in the model's *internal* latent space, i.e. after
`model.model.process_latent_in` (SD1.x: LATENT × 0.18215, SDXL: × 0.13025), in
sigma scaling (`x = x0 + σ·ε`), float32, on ComfyUI's intermediate device: exactly
what ComfyUI's samplers carry. LATENT outputs are in the user space, as every
LATENT socket is.

Later nodes (StyleAligned from a photo, Cross-Image Attention) import `INVERSION`,
`invert` and `replay` from here.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io
from tqdm.auto import tqdm

from ..inversion import Inversion, ddim_invert, ddim_sample, ddpm_invert, ddpm_replay
from .patching import model_family

INVERSION = io.Custom("INVERSION")

METHODS = ("ddim", "ddpm")


# --- checks -----------------------------------------------------------------


def check_invertible(model_sampling, family: str, node: str) -> None:
    """Refuse models whose latents are not `x = x0 + σ·ε` (the sigma space inversion/ works in)."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        raise ValueError(
            f"{node}: model: {family} is a flow-matching (rectified flow) model such as SD3 or Flux; "
            "DDIM/DDPM inversion needs a diffusion model with eps- or v-prediction (SD1.x, SD2.x, SDXL). "
            "Flow models are not supported yet."
        )
    if not isinstance(model_sampling, comfy.model_sampling.EPS):
        raise ValueError(
            f"{node}: model: {family} uses {type(model_sampling).__name__} sampling, which DDIM/DDPM inversion "
            "does not support; use an SD1.x, SD2.x or SDXL model (eps- or v-prediction)"
        )


def check_inversion(inversion, model, node: str, name: str = "inversion", *, kind: str | None = None,
                    steps: int | None = None) -> Inversion:
    """Refuse an INVERSION this node cannot use with `model`, before any model call (ValueError naming the input).

    Every node that takes an INVERSION runs its trajectory through `model`, so the inversion
    must come from the same model family (`Inversion.family`, set by DDIMInvert) with the
    model's latent channels; `kind` ("ddim"/"ddpm") where the node needs one method, `steps`
    where the node has its own step count. A node that samples a latent of its own checks
    its size with `check_inverted_size` once the latent is known.
    """
    if not isinstance(inversion, Inversion):
        raise ValueError(f"{node}: {name}: expected an INVERSION from DDIMInvert, got {type(inversion).__name__}")
    family = model_family(model)
    if inversion.family is not None and inversion.family != family:
        raise ValueError(f"{node}: {name}: it was inverted with a {inversion.family} model, this model is {family}: "
                         "invert the image with the model this node runs")
    channels = model.get_model_object("latent_format").latent_channels
    if inversion.latents.shape[2] != channels:
        raise ValueError(f"{node}: {name}: its latent has {inversion.latents.shape[2]} channels, the model's "
                         f"{channels}: invert the image with the model this node runs")
    if kind is not None and inversion.kind != kind:
        method = {"ddim": "a deterministic DDIM trajectory", "ddpm": "the edit-friendly DDPM noise maps"}[kind]
        raise ValueError(f"{node}: {name}: a {inversion.kind!r} inversion; {node} follows {method}: invert "
                         f"with DDIMInvert's method {kind!r}")
    inverted = inversion.steps if inversion.steps is not None else inversion.num_steps
    if steps is not None and inverted != steps:
        raise ValueError(f"{node}: steps: {steps} steps, but the inversion has {inverted}: the inverted trajectory "
                         f"is read at every step, so invert with {steps} steps or set steps to {inverted}")
    return inversion


def check_inverted_size(inverted, sampled, node: str, name: str = "inversion") -> None:
    """The latent being sampled must have the inverted image's (channels, height, width)."""
    inverted, sampled = tuple(inverted), tuple(sampled)
    if inverted != sampled:
        raise ValueError(f"{node}: {name}: the inverted latent is {'x'.join(map(str, inverted))} (channels x "
                         f"height/8 x width/8) but the latent being sampled is {'x'.join(map(str, sampled))}; use a "
                         f"latent of the inverted image's size ({inverted[-1] * 8}x{inverted[-2] * 8} pixels)")


def check_conditioning_batch(conditioning, batch: int, name: str, node: str) -> None:
    """ComfyUI silently repeats or truncates a conditioning batch to the latent batch: refuse that."""
    for entry in conditioning or []:
        cond_batch = entry[0].shape[0]
        if cond_batch not in (1, batch):
            raise ValueError(
                f"{node}: {name}: the conditioning has a batch of {cond_batch} but the latent has {batch} image(s); "
                f"use a conditioning batch of 1 (shared by every image) or of {batch} (one per image)"
            )


def check_steps(steps: int, node: str) -> None:
    if steps < 2:
        raise ValueError(f"{node}: steps: an inversion needs at least 2 steps, got {steps}")


def check_guidance(negative, cfg: float, node: str) -> None:
    if negative is None and cfg != 1.0:
        raise ValueError(
            f"{node}: negative: cfg is {cfg}, which needs a negative conditioning; connect one "
            "(e.g. an empty prompt) or set cfg to 1"
        )


# --- the sampler functions (KSAMPLER's `sampler_function`) -------------------


@dataclass
class InversionHolder:
    """How the trajectory leaves the sampler function (KSAMPLER returns one latent only)."""

    inversion: Inversion | None = None


class SamplerModel:
    """A KSAMPLER's model as an `inversion.Denoiser`, reporting progress the way k-diffusion samplers do.

    It remembers its last call so the progress callback can hand ComfyUI the
    `x`/`denoised` its preview and SamplerCustom's `denoised_output` need.
    """

    def __init__(self, model, extra_args, callback, total: int, disable):
        self.model, self.extra_args, self.callback = model, extra_args or {}, callback
        self.console = tqdm(total=total, disable=disable)
        self.last = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = self.model(x, sigma, **self.extra_args)
        self.last = (x, denoised, sigma)
        return denoised

    def progress(self, step: int, total: int) -> None:
        self.console.update(1)
        if step == total:
            self.console.close()
        if self.callback is not None:
            x, denoised, sigma = self.last
            self.callback({"i": step - 1, "x": x, "denoised": denoised, "sigma": sigma, "sigma_hat": sigma})

    def sampling(self):
        """The model's `model_sampling` (KSAMPLER reaches it the same way: KSamplerX0Inpaint → guider → BaseModel)."""
        base = self.model.inner_model.inner_model
        return base.model_sampling, type(base).__name__


def sample_ddim_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None,
                          holder: InversionHolder | None = None, node: str = "DDIMInversionSampler"):
    """DDIM inversion over an ASCENDING schedule (0 → σ_max); returns the inverted noise x_T."""
    if len(sigmas) >= 2 and float(sigmas[0]) > float(sigmas[-1]):
        raise ValueError(
            f"{node}: sigmas: got a descending (sampling) schedule; an inversion runs from the image up to "
            "the noise. Connect FlipSigmas between the scheduler and SamplerCustom, and turn add_noise off."
        )
    calls = SamplerModel(model, extra_args, callback, len(sigmas) - 1, disable)
    check_invertible(*calls.sampling(), node)
    inversion = ddim_invert(calls, x, sigmas, calls.progress)
    if holder is not None:
        holder.inversion = inversion
    return inversion.x_T


def sample_ddpm_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None,
                          seed: int = 0, holder: InversionHolder | None = None, node: str = "DDIMInvert"):
    """Edit-friendly DDPM inversion over a DESCENDING schedule (σ_max → 0), seeded; returns x_T."""
    calls = SamplerModel(model, extra_args, callback, len(sigmas) - 1, disable)
    check_invertible(*calls.sampling(), node)
    # A CPU generator: the same seed gives the same noise maps on every device.
    generator = torch.Generator().manual_seed(seed)
    inversion = ddpm_invert(calls, x, sigmas, generator, calls.progress)
    if holder is not None:
        holder.inversion = inversion
    return inversion.x_T


def sample_replay(model, x, sigmas, extra_args=None, callback=None, disable=None,
                  inversion: Inversion | None = None, add_final_residual: bool = True, start: int = 0,
                  node: str = "InversionReplay"):
    """Replay `inversion` over `sigmas` (its sampling schedule from step `start`) from its stored latent
    there; returns the clean latent.

    `x` (the same x_T, handed over as a user LATENT) is not used: it went through
    process_latent_out/in, and that float rounding alone, amplified by a chaotic
    model along the trajectory, would spoil the DDPM replay's exactness.
    """
    calls = SamplerModel(model, extra_args, callback, len(sigmas) - 1, disable)
    check_invertible(*calls.sampling(), node)
    x_start = inversion.latent_at(float(sigmas[0])).to(x.device)
    if inversion.kind == "ddpm":
        return ddpm_replay(calls, inversion, calls.progress, start=start, x_start=x_start,
                           add_final_residual=add_final_residual)
    return ddim_sample(calls, x_start, sigmas, calls.progress)


def ddim_inversion_sampler() -> comfy.samplers.KSAMPLER:
    """The SAMPLER for SamplerCustom (+ FlipSigmas, add_noise off)."""
    return comfy.samplers.KSAMPLER(sample_ddim_inversion)


# --- running a sampler function through ComfyUI --------------------------------


def cfg_guider(model, positive, negative, cfg: float) -> comfy.samplers.CFGGuider:
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive} if negative is None else {"positive": positive, "negative": negative})
    guider.set_cfg(cfg)
    return guider


def guided_sample(guider, sampler, sigmas, latent_image, seed: int) -> torch.Tensor:
    """`guider.sample` with zero noise (the sampler starts from `latent_image` itself), with the UI progress bar.

    `latent_image` is a user-space LATENT tensor; the result is one too, on the intermediate device.
    """
    callback = latent_preview.prepare_callback(guider.model_patcher, len(sigmas) - 1)
    samples = guider.sample(
        torch.zeros_like(latent_image), latent_image, sampler, sigmas, callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )
    return samples.to(comfy.model_management.intermediate_device())


def invert(model, latent_image: torch.Tensor, positive, negative=None, cfg: float = 1.0, steps: int = 50,
           scheduler: str = "ddim_uniform", method: str = "ddim", seed: int = 0,
           node: str = "DDIMInvert") -> tuple[torch.Tensor, Inversion]:
    """Invert a batch of user-space latents in one sampling run: (noise LATENT tensor, INVERSION).

    The noise latent is what KSamplerAdvanced (add_noise disable, same steps and
    scheduler, euler/ddim, start 0) denoises back to the image. Images do not
    interact: the UNet sees them as a batch, as a KSampler batch.

    Where the clean latent sits: at σ = 0, the end of every ComfyUI sampling
    schedule, so the first ddim step runs from σ = 0 to the schedule's lowest σ
    (ddim_uniform: timestep 1, σ ≈ 0.041 on SD's schedule). The authors' diffusers
    DDIM scheduler (set_alpha_to_one=False: null-text inversion, StyleAligned's
    inversion.py) puts it at ᾱ[0] instead (timestep 0, σ ≈ 0.029), so their first
    step is 0.029 → 0.041; the model calls and every later step are the same. The
    pack follows ComfyUI because a reconstruction through stock KSampler /
    KSamplerAdvanced ends at σ = 0: an inversion starting elsewhere would not
    meet it there. (ddim_invert accepts a schedule that starts at ᾱ[0].)
    """
    if method not in METHODS:
        raise ValueError(f"{node}: method: expected one of {METHODS}, got {method!r}")
    check_steps(steps, node)
    check_guidance(negative, cfg, node)
    batch = latent_image.shape[0]
    check_conditioning_batch(positive, batch, "positive", node)
    check_conditioning_batch(negative, batch, "negative", node)

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    holder = InversionHolder()
    if method == "ddim":
        # Ascending, from the image's exact sigma 0 (not FlipSigmas' 0.0001: the model is never called there).
        sampler = comfy.samplers.KSAMPLER(sample_ddim_inversion, {"holder": holder, "node": node})
        sigmas = sigmas.flip(0)
    else:
        sampler = comfy.samplers.KSAMPLER(sample_ddpm_inversion, {"holder": holder, "seed": seed, "node": node})
    noise = guided_sample(cfg_guider(model, positive, negative, cfg), sampler, sigmas, latent_image, seed)
    inversion = dataclasses.replace(holder.inversion, steps=steps, family=model_family(model))
    return noise, inversion.to(comfy.model_management.intermediate_device())


def replay(model, inversion: Inversion, positive, negative=None, cfg: float = 1.0,
           add_final_residual: bool = True, start: int = 0, node: str = "InversionReplay") -> torch.Tensor:
    """Denoise an INVERSION over its own schedule with `model`: a user-space LATENT tensor.

    DDPM: `ddpm_replay` with the stored noise maps (exact with the same model and
    conditioning). DDIM: deterministic DDIM (= Euler) sampling. `start` skips the
    first steps of the sampling schedule (the replay begins at the stored latent there).
    """
    check_inversion(inversion, model, node)
    check_guidance(negative, cfg, node)
    batch = inversion.latents.shape[1]
    check_conditioning_batch(positive, batch, "positive", node)
    check_conditioning_batch(negative, batch, "negative", node)
    if not 0 <= start < inversion.num_steps:
        raise ValueError(f"{node}: start: must be in [0, {inversion.num_steps - 1}] for a {inversion.num_steps}-step inversion")
    sigmas = inversion.sampling_sigmas[start:]
    sampler = comfy.samplers.KSAMPLER(
        sample_replay, {"inversion": inversion, "add_final_residual": add_final_residual, "start": start, "node": node}
    )
    x_start = model.model.process_latent_out(inversion.latent_at(float(sigmas[0])))
    return guided_sample(cfg_guider(model, positive, negative, cfg), sampler, sigmas, x_start, seed=0)


# --- nodes ------------------------------------------------------------------

CFG_TOOLTIP = (
    "Classifier-free guidance of the inversion's model calls. 1 (default) = plain DDIM inversion, one UNet call "
    "per step, the most faithful reconstruction (null-text inversion's pivot). StyleAligned inverts at 2, "
    "edit-friendly DDPM (Cross-Image Attention) at 3.5; above 1 a negative is required."
)


class DDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DDIMInvert",
            display_name="DDIM Invert (Attention Lab)",
            category="attention_lab/inversion",
            description=(
                "Inverts encoded images into the noise the model would turn back into them, and records the "
                "whole trajectory (INVERSION) for replay and for the pack's real-image nodes. Reconstruct with "
                "KSamplerAdvanced (add_noise disable, same steps and scheduler, sampler euler or ddim) or with "
                "InversionReplay (exact for ddpm). The clean latent sits at σ = 0, where ComfyUI's samplers end "
                "(the authors' diffusers scheduler puts it at ᾱ[0], σ ≈ 0.029: only the first step differs). "
                "SD1.x, SD2.x (v-prediction too) and SDXL; not flow models."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with; its patches (e.g. LoRA, attention) apply."),
                io.Latent.Input("latent", tooltip="The image(s) to invert, from VAEEncode. A batch is inverted in one call."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the image (batch 1, or one per image)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01, tooltip=CFG_TOOLTIP),
                io.Int.Input("steps", default=50, min=2, max=1000,
                             tooltip="Inversion steps (the papers use 50). Reconstruct with the same number."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="Noise schedule; ddim_uniform is the DDIM timestep spacing the papers use. "
                                       "Reconstruct with the same scheduler."),
                io.Combo.Input("method", options=list(METHODS), default="ddim",
                               tooltip="ddim: deterministic DDIM inversion (approximate round trip, error falls with "
                                       "steps). ddpm: edit-friendly DDPM inversion (Huberman-Spiegelglas et al.): "
                                       "seeded noise plus per-step noise maps, exact with InversionReplay."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="ddpm only: seed of the per-step noise (drawn for the whole batch, as KSampler "
                                     "draws its noise). Ignored by ddim."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt for cfg above 1 (style-aligned inverts with an empty "
                                              "prompt). Not needed at cfg 1."),
            ],
            outputs=[
                io.Latent.Output("noise", tooltip="The inverted noise latent x_T, for a sampler with add_noise off."),
                INVERSION.Output("inversion", tooltip="The trajectory: latents at every sigma (in the model's "
                                                      "internal latent space), the sigmas, and for ddpm the noise maps."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, positive, cfg, steps, scheduler, method, seed, negative=None) -> io.NodeOutput:
        noise, inversion = invert(model, latent["samples"], positive, negative, cfg, steps, scheduler, method, seed)
        out = latent.copy()
        out["samples"] = noise
        return io.NodeOutput(out, inversion)


class DDIMInversionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DDIMInversionSampler",
            display_name="DDIM Inversion Sampler (Attention Lab)",
            category="attention_lab/inversion",
            description=(
                "DDIM inversion as a SAMPLER for SamplerCustom: connect a scheduler through FlipSigmas (ascending "
                "sigmas) and turn add_noise off; the output is the inverted noise. Denoise it with SamplerCustom "
                "(add_noise off, euler, the unflipped sigmas) to reconstruct."
            ),
            inputs=[],
            outputs=[io.Sampler.Output(tooltip="A sampler that inverts instead of denoising; needs FlipSigmas.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(ddim_inversion_sampler())


class InversionReplay(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionReplay",
            display_name="Inversion Replay (Attention Lab)",
            category="attention_lab/inversion",
            description=(
                "Denoises an INVERSION's noise over its own schedule with the given model: ddpm replays the stored "
                "noise maps (exact reconstruction with the inverting model and prompt), ddim samples "
                "deterministically. With a patched model or another prompt the replay is an edit of the image."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to replay with; patch it (e.g. StyleAligned) to edit."),
                INVERSION.Input("inversion", tooltip="From DDIMInvert."),
                io.Conditioning.Input("positive", tooltip="The prompt; the inversion's prompt reconstructs the image."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Guidance of the replay; the inversion's cfg reconstructs. Above 1 a negative "
                                       "is required."),
                io.Boolean.Input("add_final_residual", default=True,
                                 tooltip="ddpm only: add back the model's error at the last step, making the "
                                         "reconstruction exact. The papers leave it out (off) for edits."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt for cfg above 1."),
            ],
            outputs=[io.Latent.Output(tooltip="The replayed (reconstructed or edited) latent.")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, cfg, add_final_residual, negative=None) -> io.NodeOutput:
        return io.NodeOutput({"samples": replay(model, inversion, positive, negative, cfg, add_final_residual)})
