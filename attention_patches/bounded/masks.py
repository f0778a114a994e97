"""The Bounded Attention masks as a technique: every attention layer, every step (docs/methods.md §3)."""

from __future__ import annotations

from typing import Callable

import torch

from ..backend import mask_4d
from ..call import AttentionCall
from ..router import AttentionTechnique, combine_masks
from .guidance import GuidanceProbe
from .layout import (
    BoundedLayout,
    additive,
    box_masks,
    cross_attention_allowed,
    self_attention_allowed,
    self_attention_groups,
)
from .refinement import MaskRefinement


class BoundedAttention(AttentionTechnique):
    """The bounded masks in every layer: the subjects' boxes, or the refinement's regions once it has them.

    `guidance` (the `GuidanceProbe` registered right after this technique) says
    when a guidance pass runs: its cross masks then leave the background open
    to every subject. `refinement` (a `MaskRefinement` on the same router)
    supplies the refined regions. Mask caches are per (grid, keys, dtype,
    device, layout, phase), hold only the current regions' shapes and are
    emptied whenever the regions change.
    """

    name = "bounded_attention"
    order = 40  # outside recorders and other map readers: they see the bounded masks

    def __init__(self, layout: BoundedLayout, mask_eos: bool = True, guidance: GuidanceProbe | None = None,
                 refinement: MaskRefinement | None = None):
        self.layout = layout
        self.mask_eos = mask_eos
        self.guidance = guidance
        self.refinement = refinement
        self._cache: dict = {}
        self._cache_revision = None
        # whether a technique further in wants a call (set by whoever registers this one): if not, self-attention
        # runs in query groups with one-row masks; if unknown (None), the guidance probe and refinement are asked
        self.inner_wants: Callable[[AttentionCall], bool] | None = None

    # -- regions ---------------------------------------------------------------

    def regions_for(self, call: AttentionCall, device) -> torch.Tensor:
        """The subjects' regions on this call's grid: `[S, N]` boxes, or `[images, S, N]` refined masks."""
        refined = None
        if self.refinement is not None:
            refined = self.refinement.regions(call.layout.images, (call.height, call.width), device)
        return box_masks(self.layout.boxes, call.height, call.width, device) if refined is None else refined

    # -- masks ---------------------------------------------------------------

    def mask_for(self, call: AttentionCall, keys: int, dtype, device) -> torch.Tensor | None:
        """The additive mask of this call: self `[1|B, 1, N, N]`, cross `[B, 1, N, K]` (zero on unconditional rows).

        Box regions are the same for every image; refined ones are per image, so
        the self mask then has a row per batch row (unless there is one image).
        """
        revision = None if self.refinement is None else self.refinement.revision
        if revision != self._cache_revision:
            self._cache.clear()
            self._cache_revision = revision
        guiding = self.guidance is not None and self.guidance.collecting
        key = (call.is_self, call.height, call.width, keys, dtype, device, call.layout, guiding)
        mask = self._cache.get(key)
        if mask is None:
            if len(self._cache) > 64:
                self._cache.clear()
            regions = self.regions_for(call, device)  # [S, N] or [images, S, N]
            chunks = len(call.layout.cond_or_uncond)
            if call.is_self:
                allowed = self_attention_allowed(regions)  # [N, N] or [images, N, N]
                if allowed.ndim == 3 and allowed.shape[0] > 1:
                    allowed = allowed.repeat(chunks, 1, 1)  # row chunk·images + image holds that image's mask
                mask = additive(allowed.reshape(-1, *allowed.shape[-2:]), dtype)[:, None]
            else:
                cond = additive(cross_attention_allowed(self.layout, regions, keys, guiding, self.mask_eos), dtype)
                mask = torch.zeros(chunks * call.layout.images, 1, *cond.shape[-2:], dtype=dtype, device=device)
                for chunk in call.layout.chunks(cond=True):
                    mask[call.layout.chunk_rows(chunk), 0] = cond
            self._cache[key] = mask
        return mask

    # -- dispatch ------------------------------------------------------------

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        if self.refinement is not None:
            self.refinement.refresh(call.step)
        if call.is_self and not self.inner_needs_whole_call(call):
            return self.grouped_self_attention(q, k, v, call, attend, mask)
        return attend(q, k, v, combine_masks(mask, self.mask_for(call, k.shape[1], q.dtype, q.device)))

    def inner_needs_whole_call(self, call: AttentionCall) -> bool:
        if self.inner_wants is not None:
            return self.inner_wants(call)
        return any(t is not None and t.wants(call) for t in (self.guidance, self.refinement))

    def grouped_self_attention(self, q, k, v, call: AttentionCall, attend, mask=None):
        """The bounded self-attention without an N×N mask: each group of queries that sees the same keys
        (`self_attention_groups`) attends with a one-row key mask `[1, 1, 1, N]`.

        Only where nothing inside this technique needs the whole call (`inner_wants`):
        a technique further in sees the queries in groups.
        """
        regions = self.regions_for(call, q.device)
        rows_of_image = [None] if regions.ndim == 2 else [
            torch.tensor([c * call.layout.images + i for c in range(len(call.layout.cond_or_uncond))], device=q.device)
            for i in range(call.layout.images)]
        outer = None if mask is None else mask_4d(mask)
        out = torch.empty_like(q)
        for image, rows in enumerate(rows_of_image):
            image_regions = regions if rows is None else regions[image]
            qi, ki, vi = (q, k, v) if rows is None else (q[rows], k[rows], v[rows])
            for queries, keys in self_attention_groups(image_regions):
                group_mask = None if keys is None else additive(keys, q.dtype)[None, None, None, :]
                if outer is not None:
                    own = outer if rows is None or outer.shape[0] == 1 else outer[rows]
                    group_mask = combine_masks(own if own.shape[-2] == 1 else own[..., queries, :], group_mask)
                result = attend(qi[:, queries], ki, vi, group_mask)
                if rows is None:
                    out[:, queries] = result
                else:
                    out[rows[:, None], queries[None, :]] = result
        return out
