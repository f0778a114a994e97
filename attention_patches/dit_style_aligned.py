"""StyleAligned on Flux and SD3: shared attention on a DiT's joint token layout.

A DiT attends over one sequence per image, `[T text | I image grid | E further tokens]`
(E: e.g. Flux Kontext's reference-image tokens). For every target row i and the
reference r of its chunk, in a sharing layer (docs/methods.md §1 for the UNet form):

    Q̂_i = [Q_i^T ; adain(Q_i^I, Q_r^I) ; Q_i^E]           AdaIN over image tokens only
    K̂_i = [K_i^T ; adain(K_i^I, K_r^I) ; K_i^E]           (V likewise only with adain_values)
    out_i = softmax(Q̂_i [K̂_i ; s·K_r^I]ᵀ/√d + [0 … 0, δ … δ]) · [V_i ; V_r^I]

so every token of a target, text included, also sees the reference's image tokens, while
each image's text tokens stay its own (the reference's text is not shared). The reference
row is plain attention. s = shared_score_scale, δ = shared_score_shift.

The attention itself is `style_aligned.shared_attention` (slicing, plain rows, masks
carried over), called with the AdaIN already applied to the image tokens, and with an
`attend` that keeps only the reference's image tokens of the shared key block.

RoPE: Flux rotates q and k by their positions before ComfyUI's attention override sees
them, so the reference's keys are shared with the positions of the reference's own grid
(the same grid as every target's), as the Flux StyleAligned node for ComfyUI
(Halo9Pan/ComfyUI-FluxStyleAligned: shares post-RoPE keys) does. The AdaIN statistics are
therefore taken over rotated features too (that node does the same); a diffusers Flux port
of StyleAligned instead applies AdaIN before RoPE and gives the reference keys shifted
positions, which ComfyUI's override, seeing only rotated q/k, cannot do.

Which blocks share: both Flux StyleAligned variants share in the single-stream blocks
only — the ComfyUI node patches `single_blocks` (three in four of them by default), the
diffusers port's `StyleAlignedArgs.block = (19, 57)` counts Flux's 19 double-stream blocks
first, so it is exactly the 38 single-stream blocks. "auto" does that on Flux; SD3 has only
joint (double-stream) blocks, so "auto" shares in all of them (and in SD3.5's image-only
self-attentions).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from .backend import mask_4d
from .call import AttentionCall, Layer
from .router import AttentionTechnique
from .shared_attention import SharedGroup, StyleAlignedOptions, adain, shared_attention
from .style_aligned import StyleAlignedSettings, in_step_range, plain_layers

DIT_BLOCK_CHOICES = ["auto", "single", "double", "all"]


def dit_sharing_layers(layers: Sequence[Layer], family: str, choice: str, only_self_level: float = 0.0,
                       node: str = "SharedAttentionStyleAlign") -> frozenset[Layer]:
    """The router layers that share for `choice` of DIT_BLOCK_CHOICES, less `only_self_level`'s plain ones.

    only_self_level spreads plain layers over the chosen ones in execution order, with the
    paper's `_get_switch_vec` (style_aligned.plain_layers).
    """
    if choice not in DIT_BLOCK_CHOICES:
        raise ValueError(f"{node}: dit_blocks: expected one of {DIT_BLOCK_CHOICES}, got {choice!r}")
    kinds = {layer[0] for layer in layers}
    if choice == "auto":
        choice = "single" if "single_block" in kinds else "all"
    wanted = {"single": {"single_block"}, "double": {"double_block"}, "all": kinds}[choice]
    chosen = [tuple(layer) for layer in layers if layer[0] in wanted]
    if not chosen:
        raise ValueError(f"{node}: dit_blocks: {choice!r} selects no block of this {family} model "
                         f"(it has {', '.join(sorted(kinds))} blocks); use 'auto' or 'all'")
    # plain_layers counts UNet keys in the paper's order; give it the chosen layers in execution order.
    stand_in = {("input", i, 0): layer for i, layer in enumerate(chosen)}
    plain = {stand_in[key] for key in plain_layers(list(stand_in), only_self_level)}
    return frozenset(layer for layer in chosen if layer not in plain)


def _adain_span(x: torch.Tensor, groups: Sequence[SharedGroup], span: slice) -> torch.Tensor:
    """A copy of x `[B, N, C]` whose targets' `span` tokens are AdaIN'd to their reference's."""
    out = x.clone()
    for group in groups:
        if not group.targets:
            continue
        rows = torch.as_tensor(group.targets, device=x.device)
        r = group.reference
        out[rows, span] = adain(x[rows, span], x[r : r + 1, span])
    return out


def reference_image_keys(attend: Callable, text_tokens: int, image_tokens: int) -> Callable:
    """An `attend` for shared_attention that keeps, of the appended reference block, only its image tokens.

    shared_attention appends the reference's whole sequence (N tokens) to each target's N
    keys and values; the columns kept are [own N ; reference T .. T+I).
    """

    def attend_shared(q, k, v, mask=None):
        n = q.shape[1]
        if k.shape[1] != 2 * n:  # a plain row (reference, or an image that does not share)
            return attend(q, k, v, mask)
        start, stop = n + text_tokens, n + text_tokens + image_tokens
        k = torch.cat([k[:, :n], k[:, start:stop]], dim=1)
        v = torch.cat([v[:, :n], v[:, start:stop]], dim=1)
        if mask is not None:
            mask = mask_4d(mask)
            mask = torch.cat([mask[..., :n], mask[..., start:stop]], dim=-1)
        return attend(q, k, v, mask)

    return attend_shared


def dit_shared_attention(q, k, v, call: AttentionCall, groups: Sequence[SharedGroup], attend: Callable,
                         options: StyleAlignedOptions, mask=None) -> torch.Tensor:
    """StyleAligned on one joint-attention call `[B, N, heads·dim]` (module doc's equations)."""
    if options.full_attention_share:
        raise ValueError("SharedAttentionStyleAlign: full_attention_share is not offered on Flux and SD3 "
                         "(it would join the images' text tokens too); turn it off")
    span = call.image_tokens
    if options.adain_queries:
        q = _adain_span(q, groups, span)
    if options.adain_keys:
        k = _adain_span(k, groups, span)
    if options.adain_values:
        v = _adain_span(v, groups, span)
    # AdaIN is done: adain(X_r, X_r) is the identity, so the reference block enters unchanged.
    prepared = dataclasses.replace(options, adain_queries=False, adain_keys=False, adain_values=False)
    return shared_attention(q, k, v, groups, reference_image_keys(attend, call.text_tokens, call.tokens),
                            prepared, mask)


class DitStyleAligned(AttentionTechnique):
    """StyleAligned shared attention on a Flux or SD3 model's selected layers and steps."""

    name = "SharedAttentionStyleAlign"
    order = 200  # innermost, as on the UNet
    families = frozenset({"flux", "sd3"})

    def __init__(self, settings: StyleAlignedSettings, layers: frozenset[Layer]):
        self.settings = settings
        self.layers = frozenset(map(tuple, layers))

    def active(self, layout, progress) -> bool:
        s = self.settings
        return layout.images > 1 and in_step_range(progress, s.start_percent, s.end_percent)

    def wants(self, call: AttentionCall) -> bool:
        return tuple(call.layer) in self.layers and self.active(call.layout, call.progress)

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        return dit_shared_attention(q, k, v, call, self.settings.groups(call.layout), attend,
                                    self.settings.attention, mask)

