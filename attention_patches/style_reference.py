"""StyleAligned with a real photo as the reference: the photo's inverted latent at every sampling step."""

from __future__ import annotations

import torch

from .schedule import step_index


def trajectory_step(step: int, offset: int) -> int:
    """Which inversion latent (in sampling order, 0 = noisiest) the reference takes at sampling step `step`.

    The paper's transfer notebook starts the reference at zts[offset] and, after every
    step i, overwrites it with zts[max(offset + 1, i + 1)]: so step 0 sees `offset`
    and step i ≥ 1 sees max(offset + 1, i). The offset starts the reference a few
    steps cleaner than the batch, so its structure is there from the first step.
    """
    return offset if step == 0 else max(offset + 1, step)


class ReferenceTrajectory:
    """An inverted reference latent per sampling step: the reference branch of a style-from-photo batch.

    `latents` `[n+1, C, H, W]` in sampling order (noisiest first) with their `sigmas`
    `[n+1]` (descending), in the sampler's scaling (`x = x0 + σ·ε`).
    """

    def __init__(self, latents: torch.Tensor, sigmas: torch.Tensor, offset: int):
        if latents.shape[0] != sigmas.shape[0]:
            raise ValueError(f"a trajectory needs one latent per sigma, got {latents.shape[0]} and {sigmas.shape[0]}")
        if not 0 <= offset < latents.shape[0] - 1:
            raise ValueError(f"offset: expected 0..{latents.shape[0] - 2} (the inversion has {latents.shape[0] - 1} steps), "
                             f"got {offset}")
        self.latents = latents
        self.sigmas = sigmas.double().cpu()
        self.offset = offset

    def latent_at(self, sigma: float) -> torch.Tensor:
        """The reference latent `[1, C, H, W]` for a model call at `sigma` (nearest inverted step)."""
        step = step_index(self.sigmas, sigma)
        index = min(trajectory_step(step, self.offset), self.latents.shape[0] - 1)
        return self.latents[index : index + 1]

    def __deepcopy__(self, memo):
        return self
