"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., η = 1) and its replay, in sigma space."""

from __future__ import annotations

import math
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
)
from .result import Inversion


def ddpm_step_coefficients(sigma: float, sigma_prev: float) -> tuple[float, float]:
    """Sigma-space coefficients ``(sigma_down, sigma_up)`` of one DDPM (η = 1) step σ → σ_prev.

    The paper's VP step, with ᾱ = 1/(1+σ²) (t at ``sigma``, t−1 at ``sigma_prev``)::

        σ_t² = (1−ᾱ_{t−1})/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_{t−1})
        μ_t  = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1}−σ_t²)·ε
        z_{t−1} = μ_t + σ_t·z

    Dividing by √ᾱ_{t−1} (VP → sigma space) gives ``x_prev = x̂0 + sigma_down·ε + sigma_up·z``
    with ``sigma_up = σ_t/√ᾱ_{t−1}`` and ``sigma_down = √(1−ᾱ_{t−1}−σ_t²)/√ᾱ_{t−1}``;
    in closed form ``sigma_up = σ_prev·√(σ²−σ_prev²)/σ`` and ``sigma_down = σ_prev²/σ``,
    i.e. k-diffusion's ancestral step (``get_ancestral_step`` with eta=1). The
    noise z is the same tensor in both spaces. Computed here via ᾱ, in double
    precision, to mirror the paper; both are 0 for the final step to σ_prev = 0.
    """
    abar_t = 1.0 / (1.0 + sigma * sigma)
    abar_prev = 1.0 / (1.0 + sigma_prev * sigma_prev)
    variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    # max(0, ·) only absorbs rounding when sigma_prev == 0 (then everything is exactly 0).
    sigma_up = math.sqrt(max(variance, 0.0) / abar_prev)
    sigma_down = math.sqrt(max(1.0 - abar_prev - variance, 0.0) / abar_prev)
    return sigma_down, sigma_up


@torch.no_grad()
def ddpm_invert(
    denoise: Denoiser,
    x0: Tensor,
    sigmas_desc: Tensor | Sequence[float],
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
) -> Inversion:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023, η = 1).

    1. Noise x0 independently at every level (not along one trajectory)::

           x_k = x0 + σ_k·ε̃_k,  ε̃_k ~ N(0, I)       (VP: √ᾱ·x0 + √(1−ᾱ)·ε̃, times 1/√ᾱ)

    2. For each step σ_k → σ_{k+1} (t → t−1), with the model at x_k::

           x̂0 = denoise(x_k, σ_k),  ε = (x_k − x̂0)/σ_k
           μ   = x̂0 + sigma_down·ε                  (= μ_t / √ᾱ_{t−1}, see ddpm_step_coefficients)
           z_k = (x_{k+1} − μ)/sigma_up              (the edit-friendly noise map)

       and, as in the reference code, ``x_{k+1}`` is then re-stored as
       ``μ + sigma_up·z_k`` so the next model call sees bit-for-bit what a replay
       will compute (no drift from rounding).

    The last step goes to σ = 0 where the posterior has no noise (sigma_up = 0):
    its z is 0 (as in the papers) and ``final_residual = x0 − x̂0`` records what
    the deterministic last step misses.

    Args:
        denoise: ``denoise(x, sigma) -> x0_hat`` in sigma space; CFG etc. is the
            caller's business (the papers invert with the source prompt, CFG 3.5).
        x0: the clean latent ``[B, ...]``.
        sigmas_desc: strictly descending, from σ_max down to exactly 0; at least 2 steps.
        generator: seeds the ε̃_k (drawn on the generator's device, in schedule order,
            then moved to ``x0``'s device); ``None`` uses torch's global RNG.
        callback: ``callback(step, total)``, once per model call.

    Returns:
        ``Inversion(kind="ddpm")``: ``latents[k]`` at ``sigmas[k]`` (descending, so
        ``latents[0]`` is x_T and ``latents[-1]`` is x0), ``noise_maps[k]`` for the
        step k → k+1, and ``final_residual``. float32 on ``x0``'s device.
    """
    sig = check_schedule(sigmas_desc, "sigmas_desc", "descending")
    if float(sig[-1]) != 0.0:
        raise ValueError(
            f"sigmas_desc: a DDPM inversion must end at sigma 0 (the clean latent x0), got {float(sig[-1]):.6g}"
        )
    x0 = check_latent(x0, "x0")
    n = len(sig) - 1

    noise_device = generator.device if generator is not None else x0.device
    latents = torch.empty((n + 1, *x0.shape), dtype=x0.dtype, device=x0.device)
    for k in range(n):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=noise_device)
        latents[k] = x0 + float(sig[k]) * noise.to(x0.device)
    latents[n] = x0

    noise_maps = torch.zeros((n, *x0.shape), dtype=x0.dtype, device=x0.device)
    final_residual = torch.zeros_like(x0)
    for k in range(n):
        s_cur, s_prev = float(sig[k]), float(sig[k + 1])
        x = latents[k]
        x0_hat = call_denoiser(denoise, x, s_cur)
        eps = eps_from_denoised(x, x0_hat, s_cur)
        sigma_down, sigma_up = ddpm_step_coefficients(s_cur, s_prev)
        mu = x0_hat + sigma_down * eps
        if sigma_up > 0.0:
            z = (latents[k + 1] - mu) / sigma_up
            noise_maps[k] = z
            latents[k + 1] = mu + sigma_up * z
        else:
            # Final step to sigma 0: nothing to encode in z (it stays 0, as in the papers).
            final_residual = latents[k + 1] - mu
        report(callback, k + 1, n)
    return Inversion(
        latents=latents, sigmas=sig, kind="ddpm", noise_maps=noise_maps, final_residual=final_residual
    )


@torch.no_grad()
def ddpm_replay(
    denoise: Denoiser,
    inversion: Inversion,
    callback: ProgressCallback | None = None,
    start: int = 0,
    x_start: Tensor | None = None,
    add_final_residual: bool = True,
    after_step: StepHook | None = None,
) -> Tensor:
    """Replay a DDPM inversion: ``x_{k+1} = μ(x_k) + sigma_up·z_k`` from ``latents[start]``.

    Per step (same equations as :func:`ddpm_invert`)::

        x̂0 = denoise(x_k, σ_k),  ε = (x_k − x̂0)/σ_k,  x_{k+1} = x̂0 + sigma_down·ε + sigma_up·noise_maps[k]

    This is ComfyUI's Euler-ancestral step (η = 1) with the stored noise maps as
    its noise. With the same ``denoise`` it reproduces ``inversion.latents`` and
    returns x0 (to float rounding, for any model); with a changed ``denoise``
    (another prompt, injected attention) it is the edit.

    Args:
        denoise: ``denoise(x, sigma) -> x0_hat`` in sigma space.
        inversion: a ``kind="ddpm"`` :class:`Inversion`.
        callback: ``callback(step, total)``, once per model call (total = n − start).
        start: first step to run, 0 ≤ start < n; the replay starts from
            ``latents[start]`` at ``sigmas[start]`` (Cross-Image Attention's skip_steps).
        x_start: optional latent to start from instead of ``latents[start]``; must
            broadcast with the stored noise maps.
        add_final_residual: add ``inversion.final_residual`` after the last step, making
            the reconstruction exact whatever the model's error at the smallest sigma.
            The papers leave it out (they zero the last noise map); set False for that,
            e.g. when the replay is an edit and the source image's residual should not leak.
        after_step: ``after_step(k, x_{k+1}) -> x_{k+1}``, called after each step k (an index
            of the inversion's schedule) before the next; an edit's latent-space operation
            (Cross-Image Attention's AdaIN) goes here.

    Returns:
        The float32 latent at σ = 0.
    """
    if not isinstance(inversion, Inversion) or inversion.kind != "ddpm":
        got = inversion.kind if isinstance(inversion, Inversion) else type(inversion).__name__
        raise ValueError(f"inversion: ddpm_replay needs a 'ddpm' inversion, got {got!r}")
    n = inversion.num_steps
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < n:
        raise ValueError(f"start: must be an int in [0, {n - 1}] for a {n}-step inversion, got {start!r}")
    x = check_latent(inversion.latents[start] if x_start is None else x_start, "x_start")
    sig = inversion.sigmas
    noise_maps = inversion.noise_maps
    assert noise_maps is not None  # guaranteed by Inversion for kind "ddpm"

    total = n - start
    for k in range(start, n):
        s_cur, s_prev = float(sig[k]), float(sig[k + 1])
        x0_hat = call_denoiser(denoise, x, s_cur)
        eps = eps_from_denoised(x, x0_hat, s_cur)
        sigma_down, sigma_up = ddpm_step_coefficients(s_cur, s_prev)
        x = x0_hat + sigma_down * eps + sigma_up * noise_maps[k].to(x.device)
        if after_step is not None:
            x = after_step(k, x)
        report(callback, k - start + 1, total)
    if add_final_residual and inversion.final_residual is not None:
        x = x + inversion.final_residual.to(x.device)
    return x
