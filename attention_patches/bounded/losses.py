"""The guidance losses, read from the loss layers' attention probabilities (docs/methods.md §3).

Bounded Attention's IoU loss, and the two baselines the paper compares with on
the same machinery: Layout Guidance (Chen et al.) and Attend-and-Excite
(Chefer et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .layout import Box, BoundedLayout, box_masks, token_columns

@dataclass
class LayerProbs:
    """Head-summed attention probabilities of one loss layer, conditional rows: `[B, N, K]`;
    with `head_probs` `[B, H, N, K]` the per-head ones too (for a loss with `per_head`)."""

    is_self: bool
    height: int
    width: int
    probs: torch.Tensor
    head_probs: torch.Tensor | None = None

    @classmethod
    def from_heads(cls, is_self: bool, height: int, width: int, head_probs: torch.Tensor, keep_heads: bool = False):
        return cls(is_self, height, width, head_probs.sum(1), head_probs if keep_heads else None)


def region_sums(probs: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`[B, S]`: Σ_{i ∈ queries_s, j ∈ keys_s} probs[b, i, j]; queries `[S, N]`, keys `[S, K]` (bool)."""
    return torch.einsum("bnk,sn,sk->bs", probs, queries.to(probs.dtype), keys.to(probs.dtype))


def bounded_shares(layer: LayerProbs, layout: BoundedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(fg, bg) `[B, S]` of one layer (docs/methods.md §3).

    cross: fg_s = Σ_{i∈B_s, j∈T_s∪EOS} A, bg_s = Σ_{i∈bg, j∈T_s∪EOS} A;
    self:  fg_s = Σ_{i∈B_s, j∈B_s} A,     bg_s = Σ_{i∈bg, j∈B_s} A.
    Boxes, not refined masks, as in the authors' code.
    """
    boxes = box_masks(layout.boxes, layer.height, layer.width, layer.probs.device)
    background = ~boxes.any(0)
    keys_total = layer.probs.shape[-1]
    if layer.is_self:
        context = boxes
    else:
        context = torch.stack([token_columns(list(t) + [layout.eos_token], keys_total, boxes.device)
                               for t in layout.subject_tokens])
    fg = region_sums(layer.probs, boxes, context)
    bg = region_sums(layer.probs, background.expand_as(boxes), context)
    return fg, bg


def iou_loss(fg: torch.Tensor, bg: torch.Tensor, subjects: int) -> torch.Tensor:
    """`[B, S]`: (1 − IoU)², IoU = fg / (fg + S·bg); fg, bg `[L, B, S]` are averaged over layers first."""
    fg, bg = fg.mean(0), bg.mean(0)
    return (1 - fg / (fg + subjects * bg)) ** 2


class BoundedLoss:
    """L = 1.5·Σ_{b,s} (1 − IoU_cross)² + 0.5·Σ_{b,s} (1 − IoU_self)²; normalised by B·S for the stop test."""

    name = "bounded"
    kinds = frozenset({"self", "cross"})

    def __init__(self, cross_scale: float = 1.5, self_scale: float = 0.5):
        self.cross_scale, self.self_scale = cross_scale, self_scale

    def __call__(self, layers: list[LayerProbs], layout: BoundedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        terms = {}
        for kind in (True, False):
            shares = [bounded_shares(l, layout) for l in layers if l.is_self == kind]
            if not shares:
                raise ValueError(f"bounded loss: no {'self' if kind else 'cross'}-attention loss layer ran")
            fg, bg = (torch.stack(x) for x in zip(*shares))
            terms[kind] = iou_loss(fg, bg, layout.subjects)
        loss = self.cross_scale * terms[False].sum() + self.self_scale * terms[True].sum()
        b, s = terms[False].shape
        return loss, loss / (b * s)


def floor_box_masks(boxes: Sequence[Box], height: int, width: int, device=None) -> torch.Tensor:
    """`[S, H*W]` bool: Layout Guidance's rasterisation, rows `int(y0·H):int(y1·H)`, columns `int(x0·W):int(x1·W)`."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool, device=device)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)] = True
    return masks.flatten(1)


class LayoutGuidanceLoss:
    """Layout Guidance (Chen et al., backward guidance; silent-chen/layout-guidance `compute_ca_loss`),
    on the same loss layers' cross-attention.

    Per layer ℓ, subject s, token t ∈ T_s and head h: r = Σ_{i∈B_s} A_h[i, t] / Σ_i A_h[i, t]
    (the box floored, `int(x·W)`, as theirs);
    L = Σ_ℓ Σ_s (1/|T_s|) Σ_t mean_h (1 − r)² / (S · #layers): their average over
    tokens, subjects and layers. Their mean also runs over the batch; the pack sums
    the images instead (identical for one image), so that an image's gradient does
    not shrink with the batch size. Normalised by the number of images for the stop test.
    """

    name = "layout_guidance"
    kinds = frozenset({"cross"})
    per_head = True

    def __call__(self, layers: list[LayerProbs], layout: BoundedLayout):
        cross = [l for l in layers if not l.is_self]
        if not cross:
            raise ValueError("layout guidance loss: no cross-attention loss layer ran")
        loss = 0.0
        for layer in cross:
            probs = layer.head_probs  # [B, H, N, K]
            boxes = floor_box_masks(layout.boxes, layer.height, layer.width, probs.device).to(probs.dtype)
            for s, tokens in enumerate(layout.subject_tokens):
                maps = probs[..., list(tokens)]  # [B, H, N, T]
                ratio = torch.einsum("bhnt,n->bht", maps, boxes[s]) / maps.sum(-2)
                loss = loss + ((1 - ratio) ** 2).mean((1, 2)).sum()  # mean over heads and tokens, sum over images
        loss = loss / (layout.subjects * len(cross))
        return loss, loss / cross[0].probs.shape[0]


def gaussian_kernel(kernel: int = 3, sigma: float = 0.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Attend-and-Excite's 1-D kernel (utils/gaussian_smoothing.py): `exp(−((x − mean) / (2σ))²)`, normalised.

    Their exponent divides by (2σ)², not 2σ²: the effective standard deviation
    is σ·√2 (σ = 0.5: weights .212, .576, .212). Kept, as the paper's results use it.
    """
    x = torch.arange(kernel, dtype=dtype, device=device) - (kernel - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    return g / g.sum()


def gaussian_smooth(maps: torch.Tensor, kernel: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Attend-and-Excite's smoothing of `[M, H, W]` maps (their kernel, reflect padding)."""
    g = gaussian_kernel(kernel, sigma, maps.dtype, maps.device)
    weight = (g[:, None] * g[None, :])[None, None]
    padded = F.pad(maps[:, None], (kernel // 2,) * 4, mode="reflect")
    return F.conv2d(padded, weight)[:, 0]


class AttendExciteLoss:
    """Attend-and-Excite (Chefer et al.): L = max_s (1 − max_i smooth(Ã_s)[i]).

    Ã: cross-attention of the loss layers at the largest grid, head- and layer-
    averaged; text tokens 1..EOS−1 re-softmaxed after ×100; each subject's leading
    token's map Gaussian-smoothed (3×3, σ 0.5). Boxes are not used (it is a
    neglect baseline).
    """

    name = "attend_and_excite"
    kinds = frozenset({"cross"})

    def __call__(self, layers: list[LayerProbs], layout: BoundedLayout):
        cross = [l for l in layers if not l.is_self]
        if not cross:
            raise ValueError("attend-and-excite loss: no cross-attention loss layer ran")
        largest = max(l.height * l.width for l in cross)
        used = [l for l in cross if l.height * l.width == largest]
        maps = torch.stack([l.probs for l in used]).mean(0)  # [B, N, K], summed over heads
        maps = maps / maps.sum(-1, keepdim=True)  # the head mean: rows sum to 1
        text = (maps[..., 1:layout.eos_token] * 100).softmax(-1)
        h, w = used[0].height, used[0].width
        b = text.shape[0]
        losses = []
        for token in layout.leading_tokens:
            smooth = gaussian_smooth(text[..., token - 1].reshape(b, h, w))
            losses.append((1 - smooth.flatten(1).max(1).values).clamp(min=0))
        loss = torch.stack(losses, 1).max(1).values.sum()
        return loss, loss / b


LOSSES = {cls.name: cls for cls in (BoundedLoss, LayoutGuidanceLoss, AttendExciteLoss)}
