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
    supplies the refined regions. Where nothing further in needs the whole
    call, the masks run in structured form (`gathered_attention`: per group of
    queries, attention over the keys it may see, no mask); elsewhere as
    additive masks (`mask_for`). Caches of both are per (grid, keys, device,
    layout, phase), hold only the current regions' shapes and are emptied
    whenever the regions change.
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
        # whether a technique further in wants a call (set by whoever registers this one): if not, the call runs
        # as gathered groups without a mask (`gathered_attention`); if unknown (None), the guidance probe and
        # refinement are asked
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
        self._drop_stale_cache()
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

    # -- structured form -----------------------------------------------------

    def attention_groups(self, call: AttentionCall, keys: int, device) -> list[tuple]:
        """This call's masks in structured form: `[(rows, queries, keys)]`, one entry per set of batch
        rows and group of queries that see the same keys.

        `rows` (a slice or indices; None: every row), `queries` `[n]` indices (None: every query) and
        `keys` `[k]` indices (None: every key). Self-attention: per image (refined regions are per
        image), the groups of `self_attention_groups`; cross-attention: the unconditional rows
        unmasked, and the conditional rows per group of queries held by the same subjects (at most
        2^S, S + 1 for disjoint regions), each with its row of `cross_attention_allowed`. Cached
        with the masks; O(groups · N) indices instead of an `[B, N, keys]` mask.
        """
        self._drop_stale_cache()
        guiding = self.guidance is not None and self.guidance.collecting
        cache_key = ("groups", call.is_self, call.height, call.width, keys, device, call.layout, guiding)
        groups = self._cache.get(cache_key)
        if groups is not None:
            return groups
        if len(self._cache) > 64:
            self._cache.clear()
        regions = self.regions_for(call, device)  # [S, N] or [images, S, N]
        layout = call.layout
        batch = len(layout.cond_or_uncond) * layout.images
        per_image = [(None, regions)] if regions.ndim == 2 else list(enumerate(regions))
        groups = []
        if not call.is_self:
            unconditional = layout.rows(cond=False)
            if unconditional:
                groups.append((_row_selector(unconditional, batch, device), None, None))
        for image, image_regions in per_image:
            images = range(layout.images) if image is None else [image]
            chunks = layout.chunks() if call.is_self else layout.chunks(cond=True)
            rows = [layout.row(c, i) for c in chunks for i in images]
            if not rows:
                continue
            for queries, allowed in self_attention_groups(image_regions):
                if not call.is_self:
                    allowed = cross_attention_allowed(self.layout, image_regions[:, queries[:1]], keys, guiding,
                                                      self.mask_eos)[0]
                groups.append((_row_selector(rows, batch, device),
                               None if len(queries) == image_regions.shape[-1] else queries,
                               None if allowed is None or allowed.all() else allowed.nonzero().flatten()))
        self._cache[cache_key] = groups
        return groups

    def _drop_stale_cache(self) -> None:
        revision = None if self.refinement is None else self.refinement.revision
        if revision != self._cache_revision:
            self._cache.clear()
            self._cache_revision = revision

    # -- dispatch ------------------------------------------------------------

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        if self.refinement is not None:
            self.refinement.refresh(call.step)
        if self.inner_needs_whole_call(call):
            return attend(q, k, v, combine_masks(mask, self.mask_for(call, k.shape[1], q.dtype, q.device)))
        return self.gathered_attention(q, k, v, call, attend, mask)

    def inner_needs_whole_call(self, call: AttentionCall) -> bool:
        if self.inner_wants is not None:
            return self.inner_wants(call)
        return any(t is not None and t.wants(call) for t in (self.guidance, self.refinement))

    def gathered_attention(self, q, k, v, call: AttentionCall, attend, mask=None):
        """The bounded attention without a mask of its own: one `attend` per entry of
        `attention_groups`, over that group's queries and only the keys it may see (gathered).

        Equal to the masked call (a masked key's weight is exp(finfo.min) = 0; no row is fully
        masked: every query sees itself, and SOT is never closed), and with no mask from further
        out the backend may take a fused kernel (FlashAttention) that an additive mask rules out.
        Only where nothing inside this technique needs the whole call (`inner_wants`): a
        technique further in sees the queries in groups.
        """
        groups = self.attention_groups(call, k.shape[1], q.device)
        outer = None if mask is None else mask_4d(mask)
        if len(groups) == 1 and all(part is None for part in groups[0]):
            return attend(q, k, v, mask)
        out = None
        for rows, queries, keys in groups:
            qg, kg, vg = (q, k, v) if rows is None else (q[rows], k[rows], v[rows])
            if queries is not None:
                qg = qg.index_select(1, queries)
            if keys is not None:
                kg, vg = kg.index_select(1, keys), vg.index_select(1, keys)
            group_mask = None
            if outer is not None:
                group_mask = outer if rows is None or outer.shape[0] == 1 else outer[rows]
                if queries is not None and group_mask.shape[-2] != 1:
                    group_mask = group_mask[..., queries, :]
                if keys is not None and group_mask.shape[-1] != 1:
                    group_mask = group_mask[..., keys]
            result = attend(qg, kg, vg, group_mask)
            if out is None:
                out = result.new_empty(*q.shape[:2], result.shape[-1])
            if queries is None:
                out[slice(None) if rows is None else rows] = result
            elif rows is None:
                out.index_copy_(1, queries, result)
            elif isinstance(rows, slice):
                out[rows].index_copy_(1, queries, result)  # a view of out
            else:
                out[rows[:, None], queries] = result
        return out


def _row_selector(rows: list[int], batch: int, device):
    """Batch rows as None (all of them), a slice (a run: indexing gives a view) or indices."""
    if rows == list(range(batch)):
        return None
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)
