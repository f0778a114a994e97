"""Shared plumbing for the inversion routines: argument checks and the model call.

Everything here works in ComfyUI's sigma space (see the package docstring):
``x = x0 + sigma * eps``, ``alpha_bar = 1 / (1 + sigma**2)``, the VP latent the
UNet sees is ``z = x / sqrt(1 + sigma**2)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

#: ``denoise(x, sigma) -> x0_hat``. ``x`` is a float32 sigma-space latent of shape
#: ``[B, ...]``; ``sigma`` is a float32 tensor of shape ``[B]`` on ``x``'s device
#: (the same thing ComfyUI's samplers pass as ``sigma * s_in``). The result may be
#: any floating dtype; it is cast to float32.
Denoiser = Callable[[Tensor, Tensor], Tensor]

#: ``callback(step, total)``: ``step`` is the number of model calls done so far
#: (1..total), so it maps directly onto ``ProgressBar.update_absolute(step, total)``.
ProgressCallback = Callable[[int, int], None]

# after_step(k, x_next) -> x_next: an edit's operation on the latent between two steps
StepHook = Callable[[int, Tensor], Tensor]

# All arithmetic happens in float32, whatever dtype the model runs in: the
# inversions subtract nearly equal quantities (x - x0_hat) and divide by small
# sigmas, which fp16/bf16 cannot afford.
COMPUTE_DTYPE = torch.float32


def check_latent(x: Tensor, name: str) -> Tensor:
    """Validate a latent argument and return it as a float32 tensor (no copy if it already is)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a batched latent [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    x = x.detach().to(COMPUTE_DTYPE)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: the latent contains NaN or inf values")
    return x


def check_schedule(
    sigmas: Tensor | Sequence[float],
    name: str,
    order: Literal["ascending", "descending"],
) -> Tensor:
    """Validate a sigma schedule and return it as a 1-D float32 CPU tensor.

    Requires at least 2 steps (3 sigmas, counting the 0 end), finite non-negative
    values and a *strictly* monotonic order: a repeated sigma would make a
    zero-length step (and a division by zero in the DDPM posterior).
    """
    try:
        s = torch.as_tensor(sigmas, dtype=COMPUTE_DTYPE).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name}: cannot be read as a 1-D tensor of sigmas ({exc})") from None
    if s.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D schedule, got shape {tuple(s.shape)}")
    if len(s) < 3:
        raise ValueError(
            f"{name}: need at least 2 steps, i.e. 3 sigmas counting the 0 end; got {len(s)} "
            f"sigma(s) ({len(s) - 1 if len(s) else 0} step(s))"
        )
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"{name}: sigmas must be finite and >= 0, got {s.tolist()}")
    steps = s[1:] - s[:-1]
    want_up = order == "ascending"
    good = steps > 0 if want_up else steps < 0
    if not good.all():
        reversed_order = (steps < 0).all() if want_up else (steps > 0).all()
        if reversed_order:
            hint = (
                "an inversion runs from 0 (clean) up to sigma_max: pass sigmas.flip(0) of a sampling schedule"
                if want_up
                else "a sampling/replay schedule runs from sigma_max down to 0: pass sigmas.flip(0)"
            )
            raise ValueError(f"{name}: sigmas must be strictly {order}, got them the other way round ({hint})")
        bad = int((~good).nonzero()[0])
        raise ValueError(
            f"{name}: sigmas must be strictly {order}; sigma[{bad}]={float(s[bad]):.6g} -> "
            f"sigma[{bad + 1}]={float(s[bad + 1]):.6g} breaks the order (repeated or shuffled values)"
        )
    return s


def call_denoiser(denoise: Denoiser, x: Tensor, sigma: float) -> Tensor:
    """Call ``denoise(x, sigma)`` ComfyUI-style and return a checked float32 ``x0_hat``."""
    sigma_batch = torch.full((x.shape[0],), sigma, dtype=COMPUTE_DTYPE, device=x.device)
    out = denoise(x, sigma_batch)
    if not isinstance(out, Tensor):
        raise ValueError(f"denoise: expected a Tensor from the model, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(
            f"denoise: the model returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}"
        )
    out = out.to(device=x.device, dtype=COMPUTE_DTYPE)
    # One host sync per step; worth it: a NaN would otherwise silently poison every later latent.
    if not torch.isfinite(out).all():
        raise ValueError(
            f"denoise: the model produced NaN at sigma={sigma:.6g} (or another non-finite value); "
            "try fp32 or bf16 (fp16 overflows in some models)"
        )
    return out


def eps_from_denoised(x: Tensor, x0_hat: Tensor, sigma: float) -> Tensor:
    """ε = (x − x0_hat)/σ: the noise a sigma-space latent carries (σ > 0)."""
    return (x - x0_hat) / sigma


def vp_scale(sigma: float) -> float:
    """√(1+σ²) = 1/√ᾱ: sigma-space latent = VP latent · vp_scale(σ)."""
    return math.sqrt(1.0 + sigma * sigma)


def report(callback: ProgressCallback | None, step: int, total: int) -> None:
    if callback is not None:
        callback(step, total)
