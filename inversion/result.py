"""The result of an inversion: plain tensors that a node can pass around as ``INVERSION``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from ..attention_patches.schedule import step_index

InversionKind = Literal["ddim", "ddpm"]


@dataclass(frozen=True)
class Inversion:
    """A sigma-space trajectory produced by :func:`ddim_invert` or :func:`ddpm_invert`.

    Fields (``n`` = number of steps, ``S`` = the latent's shape ``[B, C, H, W]``):

    ``latents``
        float32 tensor ``[n+1, *S]``; ``latents[k]`` is the sigma-space latent at
        ``sigmas[k]`` (``x = x0 + σ·ε``, the scaling ComfyUI's samplers carry).
        It lives on the device of the latent that was inverted.
    ``sigmas``
        float32 CPU tensor ``[n+1]`` in the order the routine walked it:
        ascending (0 → σ_max) for ``"ddim"``, descending (σ_max → 0) for ``"ddpm"``.
        So ``latents[0]`` is the clean latent of a DDIM inversion but the noisiest
        latent of a DDPM inversion; use :attr:`x_T`, :attr:`x_0` or
        :meth:`latent_at` to stay order-agnostic.
    ``kind``
        ``"ddim"`` or ``"ddpm"``.
    ``noise_maps``
        DDPM only: float32 ``[n, *S]``; ``noise_maps[k]`` is the edit-friendly
        noise ``z`` of the step ``sigmas[k] → sigmas[k+1]``. The last one (to σ=0,
        where the DDPM posterior has no noise) is 0, as in the papers.
    ``final_residual``
        DDPM only: float32 ``S``; ``x0 − x0_hat`` of that last, noise-free step
        (the model's own error at the smallest sigma). Adding it back makes a replay
        exact for any model; the papers drop it (see :func:`ddpm_replay`).
    ``steps``
        The step count the inversion was asked for, when the caller knows it
        (a scheduler such as ``ddim_uniform`` may walk one more than asked,
        so it can differ from :attr:`num_steps`); for messages.
    ``family``
        The architecture of the model that inverted, when the caller knows it
        (e.g. ``"SDXL"``, ``"SD15"``): nodes refuse a trajectory from another model.

    dtype: everything is float32 whatever dtype the model ran in.
    """

    latents: Tensor
    sigmas: Tensor
    kind: InversionKind
    noise_maps: Tensor | None = None
    final_residual: Tensor | None = None
    steps: int | None = None
    family: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("ddim", "ddpm"):
            raise ValueError(f"kind: expected 'ddim' or 'ddpm', got {self.kind!r}")
        if self.sigmas.ndim != 1 or self.latents.shape[0] != self.sigmas.shape[0]:
            raise ValueError(
                f"latents: expected one latent per sigma, got latents {tuple(self.latents.shape)} "
                f"for sigmas {tuple(self.sigmas.shape)}"
            )
        if self.kind == "ddpm":
            if self.noise_maps is None:
                raise ValueError("noise_maps: a 'ddpm' inversion needs its noise maps")
            if tuple(self.noise_maps.shape) != (self.num_steps, *self.latents.shape[1:]):
                raise ValueError(
                    f"noise_maps: expected shape {(self.num_steps, *self.latents.shape[1:])}, "
                    f"got {tuple(self.noise_maps.shape)}"
                )

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0] - 1

    def _index_of_extreme(self, largest: bool) -> int:
        return int(torch.argmax(self.sigmas) if largest else torch.argmin(self.sigmas))

    @property
    def x_T(self) -> Tensor:
        """The latent at the largest sigma (the inverted noise)."""
        return self.latents[self._index_of_extreme(largest=True)]

    @property
    def x_0(self) -> Tensor:
        """The latent at the smallest sigma (normally 0: the clean latent that was inverted)."""
        return self.latents[self._index_of_extreme(largest=False)]

    @property
    def sampling_sigmas(self) -> Tensor:
        """The schedule in sampling order (descending), e.g. for :func:`ddim_sample` from :attr:`x_T`."""
        return self.sigmas if self.kind == "ddpm" else self.sigmas.flip(0)

    def from_step(self, start: int) -> "Inversion":
        """The trajectory from sampling step ``start`` on: an inversion of its last ``num_steps − start`` steps.

        ``latents[0]`` of a ``"ddpm"`` result is the latent at ``sampling_sigmas[start]``, and its
        noise maps are those of the steps left, so replaying it from its step 0 walks exactly what a
        replay of this inversion from ``start`` walks, with step indices counted from ``start``.
        Tensors are views of this one's; ``steps`` (the count the inversion was asked for) is dropped.
        """
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < self.num_steps:
            raise ValueError(f"start: must be an int in [0, {self.num_steps - 1}] for a {self.num_steps}-step "
                             f"inversion, got {start!r}")
        # sampling order is the stored order for ddpm (descending), the reverse for ddim (ascending)
        keep = slice(start, None) if self.kind == "ddpm" else slice(0, self.num_steps + 1 - start)
        return replace(
            self,
            latents=self.latents[keep],
            sigmas=self.sigmas[keep],
            noise_maps=None if self.noise_maps is None else self.noise_maps[start:],
            steps=None,
        )

    def index_at(self, sigma: float) -> int:
        """Index of the stored sigma nearest to ``sigma`` (the rule of :func:`step_index`)."""
        return step_index(self.sigmas, sigma)

    def latent_at(self, sigma: float) -> Tensor:
        """The stored latent whose sigma is nearest to ``sigma``."""
        return self.latents[self.index_at(sigma)]

    def to(self, device: torch.device | str) -> "Inversion":
        """A copy with the latent tensors on ``device`` (sigmas stay on the CPU)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            latents=move(self.latents),
            noise_maps=move(self.noise_maps),
            final_residual=move(self.final_residual),
        )
