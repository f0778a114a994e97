"""Bounded guidance (docs/methods.md §3): the probe that reads the loss layers, and the latent's gradient steps.

At steps i < `steps`, up to `iterations` gradient steps on the latent,
`z ← z − η_i ∇_z L`, `η_i = η0 + (η1 − η0)·i/steps`, with the loss measured on
the attention probabilities of the loss layers; early stop once
L/(B·S) < `loss_threshold`.

A guidance pass is a UNet forward that exists only for its loss layers: once
the last of them ran, `GuidanceProbe` ends the pass by raising
`LossLayersDone`, which `guided_latent` catches. ComfyUI offers no documented
way for a patch to end a forward early, and running the rest of the UNet
would cost up to the whole decoder per iteration for an output nobody reads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ..backend import attention_probabilities, merge_heads, split_heads
from ..call import AttentionCall
from ..router import AttentionTechnique
from .layout import BoundedLayout
from .losses import LOSSES, BoundedLoss, LayerProbs

@dataclass(frozen=True)
class GuidanceConfig:
    """Bounded guidance's schedule (defaults: run_sd.py; SDXL step sizes 18 → 5)."""

    loss: str = "bounded"
    steps: int = 15  # guided steps: i < steps
    iterations: int = 5  # gradient steps per guided step, at most
    step_size_start: float = 8.0
    step_size_end: float = 2.0
    loss_threshold: float = 0.2  # stop a step's iterations once L/(B·S) falls below
    cross_loss_scale: float = 1.5
    self_loss_scale: float = 0.5

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"guidance loss must be one of {sorted(LOSSES)} (or no GuidanceConfig: masks only), "
                             f"got {self.loss!r}")
        if self.steps < 0 or self.iterations < 1:
            raise ValueError(f"guidance needs steps >= 0 and iterations >= 1, got {self.steps}, {self.iterations}")

    def step_size(self, step: int) -> float:
        """η_i = η0 + (η1 − η0)·i/steps."""
        return self.step_size_start + (self.step_size_end - self.step_size_start) * step / self.steps

    def make_loss(self):
        if self.loss == "bounded":
            return BoundedLoss(self.cross_loss_scale, self.self_loss_scale)
        return LOSSES[self.loss]()



class LossLayersDone(Exception):
    """Raised inside a guidance pass once the last loss layer ran: the rest of the UNet is not needed."""


class GuidanceProbe(AttentionTechnique):
    """The loss layers' attention probabilities during a guidance pass, with the pass's state.

    Registered right after `BoundedAttention` (same order), it runs just inside
    the masks: it computes the masked attention of a loss call itself (float32,
    with grad) and keeps its conditional rows' probabilities. `guide_pass()`
    opens a pass; outside one it wants no call.
    """

    name = "bounded_guidance"
    order = 40

    def __init__(self, layout: BoundedLayout, loss_layers, config: GuidanceConfig):
        if not loss_layers:
            raise ValueError("bounded guidance needs loss layers")
        self.layout = layout
        self.loss_layers = frozenset(map(tuple, loss_layers))
        self.config = config
        self.collected: list[LayerProbs] | None = None  # the open pass's layers; None outside a pass
        self._last_loss_call: tuple[int, bool] | None = None

    @property
    def loss(self):
        return self.config.make_loss()

    @property
    def collecting(self) -> bool:
        """Whether a guidance pass is open."""
        return self.collected is not None

    def guides(self, step: int | None) -> bool:
        return step is not None and step < self.config.steps

    def wants(self, call: AttentionCall) -> bool:
        """A loss call: inside a guidance pass, a loss layer of the loss's kind."""
        return (self.collected is not None and call.layer in self.loss_layers
                and ("self" if call.is_self else "cross") in self.loss.kinds)

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        probs = attention_probabilities(q, k, call.heads, mask)
        rows = torch.tensor(call.layout.rows(cond=True), device=q.device)
        self.collected.append(LayerProbs.from_heads(call.is_self, call.height, call.width, probs.index_select(0, rows),
                                                    keep_heads=getattr(self.loss, "per_head", False)))
        if (call.ordinal, call.is_self) == self._last_loss_call:
            raise LossLayersDone
        return merge_heads(probs.to(v.dtype) @ split_heads(v, call.heads))

    def last_loss_call(self, ordinals: dict) -> tuple[int, bool]:
        """(ordinal, is_self) of the loss call that runs last: cross (attn2) runs after self (attn1)."""
        last = max(ordinals[l] for l in self.loss_layers)
        return last, "cross" not in self.loss.kinds

    @contextmanager
    def guide_pass(self, ordinals: dict):
        self._last_loss_call = self.last_loss_call(ordinals)
        self.collected = []
        try:
            yield self.collected
        finally:
            self.collected = None


# -- gradient steps inside inference mode ----------------------------------------------

class _CloneInferenceTensors(TorchFunctionMode):
    """Every inference tensor an op receives (weights loaded under `torch.inference_mode()`,
    conditioning) is replaced by a detached normal copy, so autograd may save it for backward.

    Each inference tensor is copied once per mode, not once per op: a UNet pass uses its
    weights in many ops and the guidance runs several passes, and copying the weights on
    every use would cost more time and memory than the passes themselves. The copies live
    until the mode exits (one guided step).
    """

    def __init__(self):
        super().__init__()
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (the inference tensor, its copy)

    def normal(self, t):
        if not (isinstance(t, torch.Tensor) and t.is_inference()):
            return t
        held = self.copies.get(id(t))
        if held is None or held[0] is not t:  # holding the original keeps its id from being reused
            held = self.copies[id(t)] = (t, t.detach().clone())
        return held[1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*tree_map(self.normal, args), **tree_map(self.normal, kwargs or {}))


@contextmanager
def autograd_enabled():
    """Leave ComfyUI's inference mode for a gradient computation with respect to the latent only."""
    with torch.inference_mode(False), torch.enable_grad(), _CloneInferenceTensors() as copies:
        yield copies


def guided_latent(forward: Callable[[torch.Tensor], None], probe: GuidanceProbe, z: torch.Tensor,
                  step: int, ordinals: dict, preconditioner: torch.Tensor | float = 1.0):
    """Bounded guidance at one step: `z ← z − η_i·P·∇_z L`, up to `iterations` times.

    `forward(z)` runs the UNet on z (its loss layers fill the probe's pass and
    stop it with `LossLayersDone`). `P` converts the step to the space the authors
    step in (the UNet's input scaling, see nodes/bounded.py). The authors update
    after every loss, and stop once a loss (normalised by B·S) is below the
    threshold. Returns (new z detached, the normalised losses); no graph survives.
    """
    config = probe.config
    eta = config.step_size(step)
    losses = []
    with autograd_enabled():
        z = z.detach().clone()
        for _ in range(config.iterations):
            z.requires_grad_(True)
            with probe.guide_pass(ordinals) as collected:
                try:
                    forward(z)
                except LossLayersDone:
                    pass
                loss, normalized = probe.loss(list(collected), probe.layout)
            (grad,) = torch.autograd.grad(loss, z)
            z = (z - eta * preconditioner * grad).detach()
            losses.append(float(normalized.detach()))
            if losses[-1] < config.loss_threshold:
                break
    return z, losses


def sampler_consistent_denoised(denoised: torch.Tensor, x: torch.Tensor, x_guided: torch.Tensor,
                                sigma: torch.Tensor, sigma_next: float) -> torch.Tensor:
    """The denoised value that makes a sampler standing at `x` take the step it would take from `x_guided`.

    A DDIM/Euler step from x with denoised D reaches `D + (x − D)·σ'/σ`; from the
    guided latent x_g with D_g = D(x_g) it reaches `D_g + (x_g − D_g)·σ'/σ`.
    They agree for `D = D_g + (x_g − x)·σ'/(σ − σ')`: the authors' latent update
    survives the step exactly for the DDIM sampler they use (and Euler);
    multistep and ancestral samplers see the same shift of the prediction.
    """
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(denoised.dtype)
    return denoised + (x_guided - x) * sigma_next / (sigma - sigma_next)
