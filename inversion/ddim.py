"""Deterministic DDIM inversion and the matching DDIM (= Euler) sampler, in sigma space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import (
    Denoiser,
    ProgressCallback,
    StepHook,
    call_denoiser,
    check_latent,
    check_schedule,
    eps_from_denoised,
    report,
    vp_scale,
)
from .result import Inversion


@torch.no_grad()
def ddim_invert(
    denoise: Denoiser,
    x0: Tensor,
    sigmas: Tensor | Sequence[float],
    callback: ProgressCallback | None = None,
) -> Inversion:
    """DDIM inversion (the convention of null-text inversion and style-aligned's ``inversion.py``).

    In VP space, with ascending timesteps t_0 < t_1 < … < t_n, the noise is
    predicted at the NEXT (higher) timestep from the CURRENT latent::

        ε       = ε_θ(z_k, t_{k+1}, c)
        z_{k+1} = √ᾱ_{k+1}·(z_k − √(1−ᾱ_k)·ε)/√ᾱ_k + √(1−ᾱ_{k+1})·ε

    Translated to sigma space (x = z·√(1+σ²), σ = √((1−ᾱ)/ᾱ)); dividing the
    update by √ᾱ_{k+1} gives exactly::

        x̃_k     = z_k·√(1+σ_{k+1}²) = x_k·√(1+σ_{k+1}²)/√(1+σ_k²)
        ε       = (x̃_k − denoise(x̃_k, σ_{k+1}))/σ_{k+1}
        x_{k+1} = x_k + (σ_{k+1} − σ_k)·ε

    ``denoise`` is called with ``x̃_k`` rather than ``x_k`` so that, after ComfyUI
    divides its input by √(1+σ_{k+1}²), the UNet sees the same VP latent z_k
    the papers feed it, with timestep t_{k+1}.

    Args:
        denoise: ``denoise(x, sigma) -> x0_hat`` in sigma space (see ``Denoiser``).
            Classifier-free guidance, conditioning and model options are the caller's
            business: wrap them into ``denoise`` (with ComfyUI, its CFG-wrapped model is one).
        x0: the latent at ``sigmas[0]``, ``[B, ...]``. Normally ``sigmas[0] == 0`` and
            this is the clean (VAE-encoded) latent; σ_0 = 0 needs no special case since
            only σ_{k+1} > 0 is ever divided by.
        sigmas: strictly ascending, from ``sigmas[0]`` (normally 0) up to σ_max;
            at least 2 steps. A ComfyUI sampling schedule is descending: pass
            ``sigmas.flip(0)``.
        callback: ``callback(step, total)``, once per model call.

    Returns:
        ``Inversion(kind="ddim")`` with ``latents[k]`` at ``sigmas[k]`` (ascending);
        ``latents[-1]`` (= ``.x_T``) is the inverted noise latent, ready for a
        sampler that starts at σ_max. float32 on ``x0``'s device.
    """
    sig = check_schedule(sigmas, "sigmas", "ascending")
    x = check_latent(x0, "x0")
    n = len(sig) - 1

    latents = torch.empty((n + 1, *x.shape), dtype=x.dtype, device=x.device)
    latents[0] = x
    for k in range(n):
        s_cur, s_next = float(sig[k]), float(sig[k + 1])
        # Same VP latent z_k, re-expressed at the noise level the model is asked about.
        x_model = x * (vp_scale(s_next) / vp_scale(s_cur))
        x0_hat = call_denoiser(denoise, x_model, s_next)
        eps = eps_from_denoised(x_model, x0_hat, s_next)
        x = x + (s_next - s_cur) * eps
        latents[k + 1] = x
        report(callback, k + 1, n)
    return Inversion(latents=latents, sigmas=sig, kind="ddim")


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    x_T: Tensor,
    sigmas_desc: Tensor | Sequence[float],
    callback: ProgressCallback | None = None,
    after_step: StepHook | None = None,
) -> Tensor:
    """Deterministic DDIM sampling (η = 0), which in sigma space is exactly an Euler step::

        ε       = (x_k − denoise(x_k, σ_k))/σ_k
        x_{k+1} = x0_hat + σ_{k+1}·ε          (σ descending; the step to 0 returns x0_hat)

    Used with the flipped inversion schedule it reconstructs a DDIM inversion:
    ``ddim_sample(denoise, inv.x_T, inv.sampling_sigmas)``.

    It is not the exact inverse of :func:`ddim_invert`. The inversion step
    σ_k → σ_{k+1} used ε evaluated at the *lower* latent, ε(z_k, t_{k+1}); this
    sampler's step σ_{k+1} → σ_k uses the same timestep but the *upper* latent,
    ε(z_{k+1}, t_{k+1}), because z_k is not known yet. The exact inverse would solve
    the implicit equation ``x_k = x_{k+1} − (σ_{k+1} − σ_k)·ε(x_k·√(1+σ_{k+1}²)/√(1+σ_k²), σ_{k+1})``
    (e.g. by fixed-point iteration). The mismatch is O(Δσ²) per step, so the
    round-trip error shrinks as steps are added; with classifier-free guidance it
    is amplified, which is what null-text inversion optimises away.

    Args:
        denoise: ``denoise(x, sigma) -> x0_hat`` in sigma space.
        x_T: the latent at ``sigmas_desc[0]``, ``[B, ...]``.
        sigmas_desc: strictly descending schedule, normally ending with 0; at least 2 steps.
        callback: ``callback(step, total)``, once per model call.
        after_step: ``after_step(k, x_{k+1}) -> x_{k+1}``, called after each step k (an index
            of ``sigmas_desc``) before the next, as in :func:`ddpm_replay`.

    Returns:
        The float32 latent at ``sigmas_desc[-1]``.
    """
    sig = check_schedule(sigmas_desc, "sigmas_desc", "descending")
    x = check_latent(x_T, "x_T")
    n = len(sig) - 1
    for k in range(n):
        s_cur, s_next = float(sig[k]), float(sig[k + 1])
        x0_hat = call_denoiser(denoise, x, s_cur)
        eps = eps_from_denoised(x, x0_hat, s_cur)
        x = x0_hat + s_next * eps
        if after_step is not None:
            x = after_step(k, x)
        report(callback, k + 1, n)
    return x
