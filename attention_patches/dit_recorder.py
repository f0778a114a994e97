"""Attention maps of Flux and SD3: the recorder on a DiT's joint attention.

A joint call attends from `[T text | H·W image | further]` tokens to the same; the maps a
UNet's attention layers give separately are blocks of it, for the image queries:

    self  = softmax over the image keys of  Q^I (K^I)ᵀ/√d     `[HW, HW]`   (image → image)
    cross = softmax over the text keys of   Q^I (K^T)ᵀ/√d     `[HW, T]`    (image → each text token)

i.e. the joint attention's rows restricted to one key block and renormalised, so each row
sums to 1 as a UNet's self- and cross-attention rows do and the reading nodes (segments,
heat maps, PCA) apply unchanged. SD3.5's image-only self-attentions give self maps only.
Maps are averaged over the recorded blocks, steps and heads, per image, as on the UNet.
"""

from __future__ import annotations

from .backend import mask_4d
from .call import AttentionCall
from .recorder import CROSS, SELF, AttentionRecorder, RecordSelection


class DitAttentionRecorder(AttentionRecorder):
    """AttentionRecorder for Flux and SD3 joint attention (module doc)."""

    families = frozenset({"flux", "sd3"})

    def __init__(self, selection: RecordSelection, family: str, chunk_elements: int = 2**26):
        super().__init__(selection, chunk_elements)
        self.family = family  # which tokenizer's positions the cross maps' keys are (nodes/segment.py)

    def _record(self, q, k, call: AttentionCall, rows: list[int], mask, kind: str | None = None) -> None:
        image = call.image_tokens
        text = slice(0, call.text_tokens)
        if mask is not None:
            mask = mask_4d(mask)
        for kind_, keys in ((SELF, image), (CROSS, text)):
            if kind_ not in self.selection.kinds or keys.stop <= keys.start:
                continue
            part = None
            if mask is not None:
                part = mask[..., image, :] if mask.shape[-2] == q.shape[1] else mask
                part = part[..., keys] if part.shape[-1] == k.shape[1] else part
            super()._record(q[:, image], k[:, keys], call, rows, part, kind=kind_)
