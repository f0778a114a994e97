"""Null-text optimisation (Mokady et al., "Null-text Inversion"), in ComfyUI's sigma space, plain torch.

DDIM inversion at cfg 1 gives a trajectory (the pivot) that DDIM sampling at cfg 1
nearly retraces, but guided sampling (cfg 7.5) drifts away from it. Per sampling
step the unconditional embedding is optimised so that the guided DDIM step from the
current latent lands on the pivot's next latent; sampling with those per-step
embeddings then reconstructs the image at the guidance the edit needs.

As the authors' ``null_text_w_ptp`` notebook: 10 inner Adam steps per sampling step,
learning rate ``1e-2·(1 − i/100)`` at step ``i``, the loss the MSE of the VP latents
(``z = x/√(1+σ²)``, the scale the UNet sees), stopping early below ``1e-5 + i·2e-5``;
each step starts from the previous step's embedding, and the next step starts from
the latent that the optimised embedding reaches (not the pivot's). Cost: up to
``inner_steps`` forward and backward passes of the unconditional branch per step,
plus one conditional and one guided call (at 50 steps about 10–20× one sampling run).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

INNER_STEPS = 10
LEARNING_RATE = 1e-2
EPSILON = 1e-5

# denoise(x, sigma, uncond_embedding or None) -> x0_hat; None: the conditional branch
GuidedDenoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _vp(x: Tensor, sigma: float) -> Tensor:
    return x / (1.0 + sigma**2) ** 0.5


def _ddim_step(x: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    return denoised + sigma_next * (x - denoised) / sigma


def optimise_null_text(denoise: GuidedDenoiser, pivot: Tensor, sigmas_desc: Tensor, uncond: Tensor, cfg: float,
                       inner_steps: int = INNER_STEPS, learning_rate: float = LEARNING_RATE,
                       epsilon: float = EPSILON, callback: Callable[[int, int], None] | None = None) -> list[Tensor]:
    """One unconditional embedding per step of `sigmas_desc` (sampling order, ending at 0).

    `pivot[k]` is the inverted latent at `sigmas_desc[k]` (sigma space), `uncond` the null
    prompt's embedding, `cfg` the guidance of the sampling to come. Returns detached tensors
    of `uncond`'s shape and dtype.
    """
    sigmas = [float(s) for s in sigmas_desc]
    x = pivot[0].float()
    embedding = uncond.detach().clone()
    embeddings = []
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone()
        embedding = embedding.clone()
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            sigma_in = torch.full((x.shape[0],), sigma, device=x.device)
            target = _vp(pivot[i + 1].float().clone(), sigma_next)
            with torch.no_grad():
                conditional = denoise(x, sigma_in, None).float()
            embedding = embedding.detach().requires_grad_(True)
            optimiser = torch.optim.Adam([embedding], lr=learning_rate * (1.0 - i / 100.0))
            for _ in range(inner_steps):
                unconditional = denoise(x, sigma_in, embedding).float()
                guided = unconditional + cfg * (conditional - unconditional)
                loss = torch.nn.functional.mse_loss(_vp(_ddim_step(x, guided, sigma, sigma_next), sigma_next), target)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                if loss.item() < epsilon + i * 2e-5:
                    break
            embedding = embedding.detach()
            embeddings.append(embedding.clone())
            with torch.no_grad():
                unconditional = denoise(x, sigma_in, embedding).float()
                x = _ddim_step(x, unconditional + cfg * (conditional - unconditional), sigma, sigma_next)
            if callback is not None:
                callback(i + 1, len(sigmas) - 1)
    return embeddings
