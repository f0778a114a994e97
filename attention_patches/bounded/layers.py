"""The authors' layer sets for Bounded Attention, their grids, and the memory guidance and refinement need."""

from __future__ import annotations

from typing import Callable, Sequence

from ..call import Layer
from .layout import CHUNK_TOKENS

# -- the authors' layer sets --------------------------------------------------------

# The authors count attention calls (attn1 and attn2 separately) in execution
# order. SD1.5: calls 12–19 = the middle block (8² at 512 px) and the three
# layers of the first decoder attention block (16²), both kinds; SDXL: calls
# 70–81 = transformer layers 1–6 of the first decoder attention block (32² at
# 1024 px), both kinds (the paper's text says "the block"; its code uses these six).
LOSS_LAYERS = {
    "sd15": frozenset({("middle", 0, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)}),
    "sdxl": frozenset(("output", 0, i) for i in range(1, 7)),
}
# Step sizes η0 → η1 of run_sd.py / run_xl.py.
STEP_SIZES = {"sd15": (8.0, 2.0), "sdxl": (18.0, 5.0)}
# The layers whose attention maps the mask refinement averages (the authors'
# `cross_mask_layers` / `self_mask_layers`). SD1.5: calls 14–19 = the first
# decoder attention block (16² at 512 px; the middle block's 8² is left out so
# that every map has one grid); SDXL: the loss layers (32² at 1024 px).
MASK_LAYERS = {
    "sd15": frozenset({("output", 3, 0), ("output", 4, 0), ("output", 5, 0)}),
    "sdxl": LOSS_LAYERS["sdxl"],
}


# How far below the latent each transformer layer works (SD1.x/SD2.x: input 1-2, 4-5, 7-8, the
# middle, output 3-5, 6-8, 9-11; SDXL: input 4-5, 7-8, the middle, output 0-2, 3-5).
DOWNSAMPLE = {
    "sd15": {"input": {1: 1, 2: 1, 4: 2, 5: 2, 7: 4, 8: 4}, "middle": {0: 8},
             "output": {3: 4, 4: 4, 5: 4, 6: 2, 7: 2, 8: 2, 9: 1, 10: 1, 11: 1}},
    "sdxl": {"input": {4: 2, 5: 2, 7: 4, 8: 4}, "middle": {0: 4},
             "output": {0: 4, 1: 4, 2: 4, 3: 2, 4: 2, 5: 2}},
}


def layer_tokens(layer: Layer, family: str, latent: tuple[int, int]) -> int:
    """Query tokens of `layer` on a latent of `latent` (h, w) cells (the UNet rounds odd sizes up)."""
    factor = DOWNSAMPLE[family][layer[0]][layer[1]]
    return -(-latent[0] // factor) * -(-latent[1] // factor)


# The latent side the authors' layer choices were made at (SD1.5: 512 px, SDXL: 1024 px).
AUTHORS_LATENT = {"sd15": 64, "sdxl": 128}


def loss_layers_for(family: str, latent: tuple[int, int], layers: Sequence[Layer]) -> frozenset:
    """The loss layers for a latent of `latent` (h, w) cells on a UNet with `layers`.

    The authors' blocks (`LOSS_LAYERS`), and on a latent smaller than theirs also
    every layer working at the grids those blocks have at the authors' size (SD1.5:
    8² and 16²): there the authors' blocks shrink to grids a box barely covers
    (on a 16² latent the middle block is 2², the first decoder block 4²), while
    the layers at the authors' grids see the boxes as the authors' layers do.
    On the demo model (128 px) these are all attention layers but input 7-8 (4²);
    at the authors' size and above, exactly their blocks. Measured on the demo
    model (benchmarks/quality.py): the authors' blocks alone leave the subjects
    where the noise puts them.
    """
    base = LOSS_LAYERS[family]
    size = AUTHORS_LATENT[family]
    if max(latent) >= size:
        return base

    def side(layer, grid):
        factor = DOWNSAMPLE[family][layer[0]][layer[1]]
        return max(-(-grid[0] // factor), -(-grid[1] // factor))

    authors_sides = {side(layer, (size, size)) for layer in base}
    return base | frozenset(tuple(l) for l in layers
                            if l[1] in DOWNSAMPLE[family].get(l[0], {}) and side(l, latent) in authors_sides)


def memory_needed(latent: tuple[int, int], images: int, family: str, heads: Callable[[Layer], int],
                  loss_layers=frozenset(), loss_kinds=frozenset(), mask_layers=frozenset(), chunks: int = 2,
                  dtype_bytes: int = 2, text_tokens: int = CHUNK_TOKENS) -> dict[str, int]:
    """Bytes the technique's own tensors take at once on a latent of `latent` (h, w) and `images` images.

    guidance: the loss layers' float32 logits, probabilities and their gradients (3 per head,
    all layers kept for the backward pass) and a layer's dense self mask;
    refinement: the mask layers' float32 self-attention record (sum and mean) and their dense
    self masks (a recorder there needs whole calls), one per batch row once refined;
    masks: the cross-attention masks of the grids where guidance or refinement reads whole
    calls. Every other call runs as gathered query groups (`BoundedAttention.gathered_attention`):
    O(N) indices, no mask.
    """
    parts = {}
    if loss_layers:
        total = 0
        for layer in loss_layers:
            n = layer_tokens(layer, family, latent)
            if "self" in loss_kinds:
                total += 3 * images * heads(layer) * n * n * 4 + n * n * (dtype_bytes + 4)
            if "cross" in loss_kinds:
                total += 3 * images * heads(layer) * n * text_tokens * 4
        parts["guidance"] = total
    if mask_layers:
        grids = {layer_tokens(layer, family, latent) for layer in mask_layers}
        parts["refinement"] = sum(2 * images * n * n * 4 + chunks * images * n * n * (dtype_bytes + 5) for n in grids)
    read_grids = {layer_tokens(layer, family, latent) for layer in set(mask_layers) | set(loss_layers)}
    parts["masks"] = sum(chunks * images * n * text_tokens * dtype_bytes for n in read_grids)
    return parts


def largest_fitting_latent(latent: tuple[int, int], available: int, needed: Callable[[tuple[int, int]], int]):
    """The largest latent of `latent`'s aspect ratio whose `needed(latent)` bytes fit in `available` (None: none does)."""
    h, w = latent
    for side in range(max(h, w), 0, -1):
        scaled = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
        if needed(scaled) <= available:
            return scaled
    return None


class UnsupportedFamilyError(ValueError):
    pass


def unet_family(layers: Sequence[Layer]) -> str:
    """"sd15" (SD1.x/SD2.x UNets) or "sdxl", from the model's transformer layers."""
    layers = set(map(tuple, layers))
    if LOSS_LAYERS["sdxl"] <= layers and ("output", 0, 9) in layers:
        return "sdxl"
    if LOSS_LAYERS["sd15"] <= layers and not any(l[0] == "output" and l[1] < 3 for l in layers):
        return "sd15"
    raise UnsupportedFamilyError(
        "Bounded Attention's loss layers are defined for SD1.x/SD2.x UNets (middle block + output blocks 3-5) "
        "and SDXL (output block 0, depth 10); this model's attention layers match neither"
    )

