"""StyleAligned (Hertz et al. 2024): images of a batch share the style of a reference image.

The technique: which rows share with which reference (`sharing_groups`), on which
layers (`plain_layers`, `blocks`) and steps, and the router technique that runs
the shared attention there. The attention and GroupNorm math is
`shared_attention.py`; the reference taken from an inverted photo is
`style_reference.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .call import AttentionCall, ChunkLayout, Layer, StepClock
from .router import AttentionTechnique
from .shared_attention import SharedGroup, StyleAlignedOptions, shared_attention, shared_group_norm

BLOCKS = ("input", "middle", "output")


# -- which rows, layers and steps ------------------------------------------------


def parse_image_list(text: str, name: str = "share_with") -> tuple[int, ...] | None:
    """User text → image indices: "" or "all" → None (every other image); "1, 3" or "[1, 3]" → (1, 3).

    Parsed as JSON data (a bare comma list is read as a JSON array), never evaluated.
    """
    text = (text or "").strip()
    if text.lower() in ("", "all"):
        return None
    source = text if text.startswith("[") else f"[{text}]"
    try:
        value = json.loads(source)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: expected image indices like '1, 2, 3' or '[1, 2]' or 'all', got {text!r}") from error
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"{name}: expected a list of non-negative integer image indices, got {text!r}")
    return tuple(sorted(set(value)))


def sharing_groups(layout: ChunkLayout, reference: int, share_with: tuple[int, ...] | None) -> list[SharedGroup]:
    """The reference row and its target rows in every chunk (cond and uncond alike).

    Raises ValueError naming the input when the batch has no such image.
    """
    images = layout.images
    if reference >= images:
        raise ValueError(
            f"SharedAttentionStyleAlign: reference_index is {reference} but the batch has {images} image(s) "
            f"(indices 0..{images - 1})"
        )
    if share_with is None:
        chosen = [i for i in range(images) if i != reference]
    else:
        beyond = [i for i in share_with if i >= images]
        if beyond:
            raise ValueError(
                f"SharedAttentionStyleAlign: share_with names image(s) {beyond} but the batch has {images} image(s)"
            )
        chosen = [i for i in share_with if i != reference]
    return [
        SharedGroup(layout.row(chunk, reference), tuple(layout.row(chunk, i) for i in chosen))
        for chunk in range(len(layout.cond_or_uncond))
    ]


def paper_layer_order(layers: Sequence[Layer]) -> list[Layer]:
    """Self-attention layers in the order the paper's `only_self_level` counts them.

    The official code enumerates diffusers' `unet.attn_processors`, whose module order
    is down blocks, up blocks, then the mid block (diffusers registers `up_blocks`
    before `mid_block`); ComfyUI's input/output/middle map onto those one to one.
    """
    rank = {"input": 0, "output": 1, "middle": 2}
    return sorted(map(tuple, layers), key=lambda l: (rank[l[0]], l[1], l[2]))


def plain_layers(layers: Sequence[Layer], only_self_level: float) -> set[Layer]:
    """Layers that fall back to plain attention for `only_self_level` (paper: `_get_switch_vec`).

    0 → none (every layer shares); 1 → all; otherwise int(level·L) layers, every
    (L // that)-th one in the paper's order, counted from the complement above 0.5.
    """
    if not 0.0 <= only_self_level <= 1.0:
        raise ValueError(f"only_self_level: expected a fraction in [0, 1], got {only_self_level}")
    ordered = paper_layer_order(layers)
    total = len(ordered)
    if only_self_level == 0:
        return set()
    if only_self_level == 1:
        return set(ordered)
    flip = only_self_level > 0.5
    level = 1 - only_self_level if flip else only_self_level
    switched = int(level * total)
    if switched == 0:
        every = None  # fewer layers than 1/level: the paper's code would divide by zero; none switch
    else:
        every = total // switched
    chosen = {layer for i, layer in enumerate(ordered) if every is not None and i % every == 0}
    return set(ordered) - chosen if flip else chosen


def parse_blocks(text: str) -> frozenset[str]:
    """"all" or a comma list of input / middle / output → the set of UNet blocks that share."""
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return frozenset(BLOCKS)
    names = {part.strip() for part in text.replace("+", ",").split(",") if part.strip()}
    unknown = names - set(BLOCKS)
    if unknown:
        raise ValueError(f"blocks: expected 'all' or a list of input, middle, output; got {sorted(unknown)}")
    return frozenset(names)


def check_step_range(start_percent: float, end_percent: float) -> None:
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(
            f"start_percent/end_percent: expected 0 <= start <= end <= 1, got {start_percent} and {end_percent}"
        )


def in_step_range(progress: float | None, start_percent: float, end_percent: float) -> bool:
    """Active on steps with start ≤ progress < end (progress = step/total); always outside sampling."""
    # progress = step/total < 1 on every step, so end = 1 covers the whole schedule
    return progress is None or start_percent <= progress < end_percent


# -- the technique ----------------------------------------------------------------


@dataclass
class StyleAlignedSettings:
    """Everything the node sets; validated on construction."""

    reference_index: int = 0
    share_with: tuple[int, ...] | None = None
    attention: StyleAlignedOptions = field(default_factory=StyleAlignedOptions)
    only_self_level: float = 0.0
    blocks: frozenset[str] = frozenset(BLOCKS)
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self):
        if self.reference_index < 0:
            raise ValueError(f"reference_index: expected an image index >= 0, got {self.reference_index}")
        if not math.isfinite(self.attention.shared_score_shift):
            raise ValueError(f"shared_score_shift: expected a finite number, got {self.attention.shared_score_shift}")
        check_step_range(self.start_percent, self.end_percent)
        if self.share_with is not None and not set(self.share_with) - {self.reference_index}:
            named = f"only image {self.reference_index}, the reference itself" if self.share_with else "no image"
            raise ValueError(
                f"SharedAttentionStyleAlign: share_with names {named}: no image would take its style; "
                "list other images of the batch (e.g. '1, 2, 3') or use 'all'"
            )

    def groups(self, layout: ChunkLayout) -> list[SharedGroup]:
        return sharing_groups(layout, self.reference_index, self.share_with)


class StyleAligned(AttentionTechnique):
    """Shared self-attention against a reference image, on the layers and steps the settings select."""

    name = "style_aligned"
    # Innermost: techniques further out see the plain N-token call; a mask they set
    # is carried over to the reference key block (see `shared_keys_mask`).
    order = 200

    def __init__(self, settings: StyleAlignedSettings, layers: Sequence[Layer]):
        self.settings = settings
        plain = plain_layers(layers, settings.only_self_level)
        self.layers = frozenset(l for l in map(tuple, layers) if l not in plain and l[0] in settings.blocks)

    def active(self, layout: ChunkLayout, progress: float | None) -> bool:
        """Whether this model call shares at all (a batch of one image never does)."""
        s = self.settings
        return layout.images > 1 and in_step_range(progress, s.start_percent, s.end_percent)

    def wants(self, call: AttentionCall) -> bool:
        return call.is_self and tuple(call.layer) in self.layers and self.active(call.layout, call.progress)

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        latent_rows = (call.options.get("original_shape") or q.shape)[0]
        if q.shape[0] != latent_rows:
            # e.g. HyperTile folds attention tiles into the batch: rows are no longer images
            raise ValueError(
                f"SharedAttentionStyleAlign: self-attention at {call.layer} has {q.shape[0]} rows for a batch of "
                f"{latent_rows} latents: another patch (e.g. HyperTile) split the images into tiles, and the "
                "reference image can no longer be found; remove that patch or StyleAligned"
            )
        return shared_attention(q, k, v, self.settings.groups(call.layout), attend, self.settings.attention, mask)


class SharedNormState:
    """Which rows share GroupNorm statistics during the current UNet forward (None: none).

    Set by the model wrapper around each forward, read by every patched GroupNorm:
    GroupNorm has no transformer_options, so the batch layout reaches it this way.
    """

    def __init__(self):
        self.groups: list[SharedGroup] | None = None

    def __deepcopy__(self, memo):
        return self


class SharedGroupNormForward:
    """A GroupNorm's forward with `share_group_norm`: installed per module, calls the module's own forward."""

    def __init__(self, forward: Callable, state: SharedNormState):
        self.forward = forward
        self.state = state

    def __call__(self, x):
        groups = self.state.groups
        if not groups:
            return self.forward(x)
        return shared_group_norm(x, groups, self.forward)

    def __deepcopy__(self, memo):
        return self


def zero_reference_control(control: dict | None, groups: Sequence[SharedGroup], batch: int) -> dict | None:
    """ControlNet residuals with the reference rows zeroed (the paper gives the reference no control).

    `control` is ComfyUI's `{"input"|"middle"|"output": [tensor | None, ...]}`; residuals
    whose batch is not the UNet batch (nor 1) cannot be addressed by row and pass
    unchanged. New tensors are returned: residuals may be shared between entries.
    """
    if not control or not groups:
        return control
    references = [g.reference for g in groups if g.targets]
    if not references:
        return control
    out = {}
    for key, residuals in control.items():
        if not isinstance(residuals, list):
            out[key] = residuals
            continue
        zeroed = []
        for r in residuals:
            if isinstance(r, torch.Tensor) and r.shape[0] in (1, batch):
                keep = torch.ones(batch, *([1] * (r.ndim - 1)), dtype=r.dtype, device=r.device)
                keep[references] = 0
                r = r * keep
            zeroed.append(r)
        out[key] = zeroed
    return out


def call_progress(clock: StepClock, options: dict) -> float | None:
    """step/total of the current model call, from the sigmas in transformer_options."""
    step, total, _ = clock.read(options)
    if step is None or not total:
        return None
    return step / total
