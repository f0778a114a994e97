"""Diffusion inversion in ComfyUI's sigma space, in plain torch (no ComfyUI import).

Conventions (ComfyUI's ``ModelSamplingDiscrete``, eps- and v-prediction alike):

* ``σ = √((1−ᾱ)/ᾱ)``, ``ᾱ = 1/(1+σ²)``;
* a sampler carries ``x = z·√(1+σ²) = x0 + σ·ε`` where ``z = √ᾱ·x0 + √(1−ᾱ)·ε`` is the
  VP latent the papers (and the UNet) use;
* the model is a callable ``denoise(x, sigma) -> x0_hat``; with ComfyUI that is
  ``lambda x, s: model(x, s, **extra_args)`` (a CFG-wrapped model included), where
  ``sigma`` is a float32 ``[B]`` tensor like the ``sigma * s_in`` samplers pass;
* ``ε = (x − x0_hat)/σ``; a deterministic DDIM step ``x' = x0_hat + σ'·ε`` is an Euler step.

Flow-matching models (``CONST`` sampling: SD3, Flux) use ``x = (1−σ)·x0 + σ·ε``
instead; these routines do not apply to them as written.

dtype: all arithmetic is float32 and every returned latent is float32, whatever
dtype the model runs in (its outputs are cast up). Latents stay on the device of
the input latent; schedules are float32 CPU tensors.

Progress: every routine takes ``callback(step, total)``, called once per model call
with ``step`` = calls done so far (1..total).
"""

from ._common import Denoiser, ProgressCallback
from .ddim import ddim_invert, ddim_sample
from .ddpm import ddpm_invert, ddpm_replay, ddpm_step_coefficients
from .result import Inversion, InversionKind

__all__ = [
    "Denoiser",
    "Inversion",
    "InversionKind",
    "ProgressCallback",
    "ddim_invert",
    "ddim_sample",
    "ddpm_invert",
    "ddpm_replay",
    "ddpm_step_coefficients",
]
