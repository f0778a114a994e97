"""Bounded Attention (Dahary et al., 2024; omer11a/bounded-attention): plain torch.

Several subjects, each in its box, without leakage between them:

- masks (every attention layer, every step), added to the logits with
  `mask_min` (finfo.min) rather than -inf:
  cross-attention, conditional rows only: subject and filter token columns are
  closed; subject s's columns reopen for the queries inside s's region; while
  denoising, background queries also lose EOS. During a guidance pass the
  background keeps EOS and sees every subject's tokens (the authors'
  `optimized` phase).
  self-attention, every row: a query inside subject s attends to background keys
  and keys of the subjects containing it; background queries are unrestricted.
- bounded guidance: at steps i < `steps`, up to `iterations` gradient steps on the
  latent, `z ← z − η_i ∇_z L`, `η_i = η0 + (η1 − η0)·i/steps`, with the loss
  measured on the attention probabilities of the authors' loss layers
  (`LOSS_LAYERS`); early stop once L/(B·S) < `loss_threshold`. Two baselines
  the paper compares with are other losses for the same machinery:
  Layout Guidance (Chen et al.) and Attend-and-Excite (Chefer et al.).
- mask refinement: from step `start_step` (15) on, rebuilt every `every` (5)
  steps, the subject regions the masks use are no longer the boxes but the
  subjects' shapes: KMeans (3·S clusters) on the running mean of the mask
  layers' self-attention, each cluster given to the subject whose cross-
  attention mask covers it most, background below 0.2; a subject left without
  a cluster falls back to its box. The maps come from the shared
  `AttentionRecorder` (recorder.py), restricted to denoising passes.

Boxes are `[x0, y0, x1, y1]`, normalised, origin top-left. Token indices are
positions in one 77-token chunk of the prompt (SOT = 0).

Where the pack differs from the authors' code, and why:
- self-attention masks are applied per group of queries (`self_attention_groups`,
  one key row per group) instead of as a dense N×N mask, wherever nothing further
  in needs the whole call: identical results, O(N) memory;
- a box that rounds to no cell on a coarse grid keeps the cell at its centre
  (`box_masks`; their grids never empty a box);
- below the authors' image size the loss also reads the layers at their grids
  (`loss_layers_for`); at their size and above, their blocks exactly;
- Layout Guidance sums its per-image losses where theirs averages the batch.

On the demo model (benchmarks/quality.py) the masks cannot stop leakage: its small
text encoder routes 65-99% of the cross-attention to the padding after EOS (SD1's
tokenizer pads with the end token, which a causal encoder fills with the whole
prompt), which the masks leave open to every pixel, as the authors leave padding
open; closing it starves the image (no object, no background). Placement comes
from the guidance.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .backend import attention_probabilities, mask_4d, mask_min, merge_heads, split_heads
from .call import AttentionCall, Layer
from .recorder import CROSS, SELF, AttentionRecorder, RecordSelection
from .router import AttentionTechnique, combine_masks
from .segmentation import kmeans_segments

CHUNK_TOKENS = 77  # one CLIP text chunk; longer contexts repeat the chunk layout

# The authors' filter tokens are chosen by NLTK part-of-speech tags (determiners,
# conjunctions, numbers, prepositions, pronouns, modals, ...) plus left/right/
# top/bottom. Without a tagger, the closed-class English words those tags cover:
FILTER_WORDS = frozenset("""
a an the this that these those some any each every either neither no all both half such what which whose
and or but nor so yet plus
of in on at by for with from to into onto upon over under above below behind beside besides between among
near through across along around against toward towards about after before during inside outside within
without beneath underneath next than as like via per off out up down
left right top bottom
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
there here can could may might must shall should will would
one two three four five six seven eight nine ten eleven twelve
""".split())


def is_filter_word(word: str) -> bool:
    return word.lower() in FILTER_WORDS or word.isdigit()


# -- the prompt's subjects and boxes ---------------------------------------------


Box = tuple  # (x0, y0, x1, y1), normalised


def check_box(box, name: str = "box") -> Box:
    """A normalised box as a tuple, or a ValueError saying what is wrong with it."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(c, (int, float)) for c in box):
        raise ValueError(f"{name}: expected [x0, y0, x1, y1] (4 numbers), got {box!r}")
    x0, y0, x1, y1 = (float(c) for c in box)
    if not all(0.0 <= c <= 1.0 for c in (x0, y0, x1, y1)):
        raise ValueError(f"{name}: {list(box)} lies outside [0, 1]; boxes are normalised [x0, y0, x1, y1]")
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{name}: {list(box)} is empty; need x1 > x0 and y1 > y0")
    return (x0, y0, x1, y1)


@dataclass(frozen=True)
class BoundedLayout:
    """Which tokens are which subject, and where each subject goes."""

    boxes: tuple  # one Box per subject
    subject_tokens: tuple  # per subject, its token positions (1-based, SOT = 0)
    eos_token: int
    filter_tokens: tuple = ()
    leading_tokens: tuple = ()  # per subject, the token whose map is "the subject" (its noun); default: last token
    names: tuple = ()

    def __post_init__(self):
        if not self.boxes:
            raise ValueError("bounded attention needs at least one subject with a box")
        if len(self.boxes) != len(self.subject_tokens):
            raise ValueError(f"{len(self.boxes)} boxes for {len(self.subject_tokens)} subjects: give one box per subject")
        object.__setattr__(self, "boxes", tuple(check_box(b, f"box {i}") for i, b in enumerate(self.boxes)))
        for i, tokens in enumerate(self.subject_tokens):
            if not tokens or not all(0 < t < CHUNK_TOKENS for t in tokens):
                raise ValueError(f"subject {i}: token positions must be in 1..{CHUNK_TOKENS - 1}, got {tokens}")
        if not 0 < self.eos_token < CHUNK_TOKENS:
            raise ValueError(f"eos_token must be in 1..{CHUNK_TOKENS - 1}, got {self.eos_token}")
        if not self.leading_tokens:
            object.__setattr__(self, "leading_tokens", tuple(t[-1] for t in self.subject_tokens))

    @property
    def subjects(self) -> int:
        return len(self.boxes)


def box_masks(boxes: Sequence[Box], height: int, width: int, device=None) -> torch.Tensor:
    """`[S, H*W]` bool: the grid cells inside each box.

    Rows `round(y0·H):round(y1·H)`, columns `round(x0·W):round(x1·W)` with
    Python's round (half to even), as the authors rasterise boxes. Where that
    leaves a box no row or no column (a small box on a coarse grid: a 0.25-wide
    box on the 2² middle block of a 16² latent), it keeps the row/column holding
    its centre: the authors' grids (8² and up at 512 px) never empty a box, and
    an empty region would hide the subject's tokens from the whole layer.
    """
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool, device=device)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        rows = _cells(y0, y1, height)
        columns = _cells(x0, x1, width)
        masks[i, rows, columns] = True
    return masks.flatten(1)


def _cells(start: float, end: float, cells: int) -> slice:
    """The grid cells `round(start·n):round(end·n)`, or the cell holding the centre if that is empty."""
    first, last = round(start * cells), round(end * cells)
    if last > first:
        return slice(first, last)
    centre = min(int((start + end) / 2 * cells), cells - 1)
    return slice(centre, centre + 1)


def token_columns(tokens: Sequence[int], keys: int, device=None) -> torch.Tensor:
    """`[keys]` bool: the columns of `tokens` in every 77-token chunk of a context of `keys` tokens."""
    if keys % CHUNK_TOKENS:
        raise ValueError(f"a text context of {keys} tokens is not made of {CHUNK_TOKENS}-token chunks")
    chunk = torch.zeros(CHUNK_TOKENS, dtype=torch.bool, device=device)
    chunk[list(tokens)] = True
    return chunk.repeat(keys // CHUNK_TOKENS)


def cross_attention_allowed(layout: BoundedLayout, regions: torch.Tensor, keys: int,
                            include_background: bool, mask_eos: bool = True) -> torch.Tensor:
    """`[..., N, keys]` bool: which text tokens each query may attend to.

    `regions` `[..., S, N]` bool is each subject's region (its box, or its refined mask).
    """
    device = regions.device
    background = ~regions.any(-2)  # [..., N]
    closed = token_columns([t for ts in layout.subject_tokens for t in ts] + list(layout.filter_tokens), keys, device)
    allowed = (~closed).expand(*regions.shape[:-2], regions.shape[-1], keys).clone()
    if include_background:
        regions = regions | background.unsqueeze(-2)
    for s, tokens in enumerate(layout.subject_tokens):
        columns = token_columns(tokens, keys, device)
        allowed |= regions[..., s, :, None] & columns  # reopen s's tokens inside s's region
    if mask_eos and not include_background:
        allowed &= ~(background[..., :, None] & token_columns([layout.eos_token], keys, device))
    return allowed


def self_attention_allowed(regions: torch.Tensor) -> torch.Tensor:
    """`[..., N, N]` bool: a query inside subject s sees background keys and keys of the subjects containing it."""
    background = ~regions.any(-2)
    shared = torch.einsum("...sq,...sk->...qk", regions.float(), regions.float()) > 0
    return background[..., :, None] | background[..., None, :] | shared


def self_attention_groups(regions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One image's self-attention mask in structured form: `[(queries, keys)]`, one entry per set of subjects.

    `regions` `[S, N]` bool. The queries `[n]` (indices) held by the same subjects
    share one row of `self_attention_allowed`: `keys` `[N]` bool (None: every key,
    the background's row). At most 2^S groups, S + 1 for disjoint regions; the
    mask is O(groups · N) instead of N².
    """
    background = ~regions.any(0)
    signatures, group_of = torch.unique(regions.T, dim=0, return_inverse=True)  # [G, S], [N]
    groups = []
    for g, signature in enumerate(signatures):
        queries = (group_of == g).nonzero().flatten()
        keys = background | regions[signature].any(0) if signature.any() else None
        groups.append((queries, keys))
    return groups


def additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """0 where allowed, `finfo(dtype).min` elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, mask_min(dtype))


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
    masks: the cross-attention masks of every grid. Self-attention elsewhere runs in
    query groups (`self_attention_groups`) and needs no N×N tensor.
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
    every_grid = {layer_tokens((kind, block, 0), family, latent) for kind, blocks in DOWNSAMPLE[family].items()
                  for block in blocks}
    parts["masks"] = sum(chunks * images * n * text_tokens * dtype_bytes for n in every_grid)
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


# -- losses ------------------------------------------------------------------------


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


# -- mask refinement ---------------------------------------------------------------------


@dataclass(frozen=True)
class RefinementConfig:
    """When and how the subject masks are refined (defaults: run_sd.py / run_xl.py and BoundedAttention's)."""

    start_step: int = 15  # first_refinement_step: the boxes are the regions before it
    every: int = 5  # delta_refine_mask_steps: rebuilt at the steps divisible by this
    clusters_per_subject: int = 3  # num_clusters_per_subject: KMeans runs with S·this clusters
    cross_threshold: float = 0.2  # cross_mask_threshold: midpoint of the sigmoid on the max-normalised cross map
    sharpness: float = 10.0  # scale of that sigmoid
    assignment_threshold: float = 0.2  # self_mask_threshold: a cluster covered less than this is background
    seed: int = 1  # KMeans seed

    def __post_init__(self):
        if self.start_step < 0 or self.every < 1 or self.clusters_per_subject < 1:
            raise ValueError("mask refinement needs start_step >= 0, every >= 1 and clusters_per_subject >= 1, got "
                             f"{self.start_step}, {self.every}, {self.clusters_per_subject}")

    def last_rebuild_step(self, total_steps: int) -> int | None:
        """The last step of a `total_steps` run at which the masks are rebuilt (None: never)."""
        if self.start_step >= total_steps:
            return None
        last_multiple = (total_steps - 1) // self.every * self.every
        return max(self.start_step, last_multiple)


def normalise_maps(maps: torch.Tensor, dim: int, reduce_min: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """The authors' map normalisation along `dim`: `m / (max m + ε)`, or `(m − min m) / (max m − min m + ε)`."""
    low = maps.amin(dim, keepdim=True) if reduce_min else 0.0
    return (maps - low) / (maps.amax(dim, keepdim=True) - low + eps)


def leading_token_maps(cross: torch.Tensor, leading_tokens: Sequence[int]) -> torch.Tensor:
    """`[..., S, N]`: each subject's leading-token column of a cross map `[..., N, K]` (its copies in every 77-token chunk added)."""
    columns = torch.stack([token_columns([t], cross.shape[-1], cross.device) for t in leading_tokens])  # [S, K]
    return torch.einsum("...nk,sk->...sn", cross, columns.to(cross.dtype))


def subject_cross_masks(cross_maps: torch.Tensor, existing: torch.Tensor, threshold: float = 0.2,
                        sharpness: float = 10.0) -> torch.Tensor:
    """Soft `[S, N]` masks: `minmax(sigmoid(sharpness·(m/max m − threshold))) · existing`.

    `cross_maps` `[S, N]` are the subjects' leading-token cross-attention maps;
    `existing` `[S, N]` bool are the regions in use (the boxes at the first
    refinement, the previous refined masks after), which confine each subject.
    """
    soft = torch.sigmoid(sharpness * (normalise_maps(cross_maps, -1) - threshold))
    return normalise_maps(soft, -1, reduce_min=True) * existing.to(soft.dtype)


def assign_clusters(labels: torch.Tensor, cross_masks: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """`[S, N]` bool: each cluster goes to the subject whose cross mask covers it most, or to the background.

    score(s, c) = Σ_{i∈c} cross_s[i] / min(Σ_i cross_s[i], |c|); a cluster goes to
    argmax_s score, unless that score is below `threshold`. `labels` `[N]` are
    cluster ids, `cross_masks` `[S, N]` soft masks in [0, 1].
    """
    members = F.one_hot(labels.long(), int(labels.max()) + 1).to(cross_masks.dtype)  # [N, C]
    overlap = cross_masks @ members  # [S, C]
    smaller = torch.minimum(cross_masks.sum(-1, keepdim=True), members.sum(0, keepdim=True))
    score, subject = (overlap / smaller.clamp_min(1e-12)).max(0)  # [C]
    owner = torch.where(score >= threshold, subject, -1)[labels.long()]  # [N]; -1 = background
    return owner[None, :] == torch.arange(cross_masks.shape[0], device=owner.device)[:, None]


def fall_back_to_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """A subject whose mask `[S, N]` is empty gets its box, which every other subject's mask then leaves (in subject order)."""
    masks = masks.clone()
    for s in range(masks.shape[0]):
        if not masks[s].any():
            masks &= ~boxes[s]
            masks[s] = boxes[s]
    return masks


def refined_subject_masks(self_attention: torch.Tensor, cross_maps: torch.Tensor, boxes: torch.Tensor,
                          existing: torch.Tensor, grid: tuple[int, int], clusters: int,
                          config: RefinementConfig = RefinementConfig()) -> torch.Tensor:
    """One image's refined subject regions `[S, N]` bool, on the token grid of its maps.

    `self_attention` `[N, N]` (mean over the mask layers, steps and heads) is
    clustered row by row after normalising each key column by its maximum;
    `cross_maps` `[S, N]` are the leading tokens' mean cross-attention maps;
    `boxes` and `existing` `[S, N]` bool are the subjects' boxes and the regions
    in use. KMeans (sklearn, n_init 10, seeded) stands in for the authors'
    torch_kmeans (100 initialisations, then warm-started): both aim at the same
    minimum, ours is deterministic from the seed.
    """
    features = normalise_maps(self_attention.float(), -2)
    labels = kmeans_segments(features, grid, min(clusters, grid[0] * grid[1]), config.seed).flatten()
    cross = subject_cross_masks(cross_maps.float(), existing, config.cross_threshold, config.sharpness)
    return fall_back_to_boxes(assign_clusters(labels, cross, config.assignment_threshold), boxes)


def resize_regions(regions: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Regions `[..., S, h·w]` bool on `grid` as regions on a `size` grid (nearest-exact, as the authors)."""
    if tuple(grid) == tuple(size):
        return regions
    maps = regions.float().reshape(-1, regions.shape[-2], *grid)
    big = F.interpolate(maps, size=tuple(size), mode="nearest-exact")
    return big.reshape(*regions.shape[:-1], size[0] * size[1]).bool()


class SubjectMapRecorder(AttentionRecorder):
    """The shared recorder as the refinement reads it: the mask layers' denoising passes only.

    The authors average the maps of un-optimised passes, so guidance passes are
    skipped; so are the steps after the run's last rebuild, whose maps nobody
    reads (a run shorter than `start_step` records nothing).
    """

    def __init__(self, technique: "BoundedAttention", layers):
        super().__init__(RecordSelection(layers=frozenset(map(tuple, layers)), max_tokens=None))
        self.technique = technique

    def wants(self, call: AttentionCall) -> bool:
        if self.technique.collected is not None or call.step is None or not call.total_steps:
            return False
        last = self.technique.refinement.last_rebuild_step(call.total_steps)
        return last is not None and call.step < last and super().wants(call)


# -- the technique -------------------------------------------------------------------


class LossLayersDone(Exception):
    """Raised inside a guidance pass once the last loss layer ran: the rest of the UNet is not needed."""


class BoundedAttention(AttentionTechnique):
    """The bounded masks in every layer, and the loss layers' probabilities during guidance passes.

    `guide_pass()` opens a guidance pass: loss layers compute their attention
    here (with grad), and the last one raises `LossLayersDone`. Mask caches
    are per (grid, keys, dtype, device, layout, phase), hold only the current
    run's shapes and are emptied whenever the regions change.

    With `refinement`, `recorder` (register it on the same router) averages
    the `mask_layers`' maps, and from `refinement.start_step` on the masks use
    the refined regions `refined` (`[images, S, h·w]` on `refined_grid`), rebuilt
    at the steps listed in `refinements`. `begin_run()` must start every
    sampling run.
    """

    name = "bounded_attention"
    order = 40  # outside recorders and other map readers: they see the bounded masks

    def __init__(self, layout: BoundedLayout, loss_layers=frozenset(), guidance: GuidanceConfig | None = None,
                 mask_eos: bool = True, masks: bool = True, refinement: RefinementConfig | None = None,
                 mask_layers=frozenset()):
        self.layout = layout
        self.loss_layers = frozenset(map(tuple, loss_layers))
        self.guidance = guidance
        self.loss = guidance.make_loss() if guidance else None
        self.mask_eos = mask_eos
        self.masks = masks
        self.collected: list[LayerProbs] | None = None
        self._last_loss_call = None
        self._cache: dict = {}
        if guidance and not self.loss_layers:
            raise ValueError("bounded guidance needs loss layers")
        if refinement and not mask_layers:
            raise ValueError("bounded mask refinement needs mask layers to record")
        self.refinement = refinement
        self.recorder = SubjectMapRecorder(self, mask_layers) if refinement else None
        # whether a technique further in wants a call (set by whoever registers this one): if not, self-attention
        # runs in query groups with one-row masks; if unknown (None), the recorder of the refinement is asked
        self.inner_wants: Callable[[AttentionCall], bool] | None = None
        self.begin_run()

    def begin_run(self) -> None:
        """A sampling run starts: back to the boxes, and a fresh record."""
        self.refined: torch.Tensor | None = None
        self.refined_grid: tuple[int, int] | None = None
        self.refinements: list[int] = []  # steps at which this run rebuilt the regions
        self._considered_step = None
        self._cache.clear()
        if self.recorder is not None:
            self.recorder.begin_run()

    # -- regions ---------------------------------------------------------------

    def refresh_regions(self, step: int | None) -> None:
        """At the first call of a refinement step: rebuild the regions from the recorded maps.

        As the authors: the first time at `start_step`, then at every step
        divisible by `every`, from the maps of the steps before (this step's
        are not recorded yet). Nothing recorded (the recorder is not on the
        router): the boxes stay.
        """
        config = self.refinement
        if config is None or step is None or step < config.start_step or step == self._considered_step:
            return
        self._considered_step = step
        if self.refined is not None and step % config.every:
            return
        recorder = self.recorder
        if not recorder.grids(SELF) or not recorder.grids(CROSS):
            return
        grid = recorder.grids(SELF)[0]
        self_maps = recorder.mean(SELF, grid)  # [images, N, N]
        cross_maps = leading_token_maps(recorder.mean(CROSS, grid), self.layout.leading_tokens)  # [images, S, N]
        boxes = box_masks(self.layout.boxes, *grid)
        existing = self.refined if self.refined is not None else boxes.expand(self_maps.shape[0], *boxes.shape)
        clusters = config.clusters_per_subject * self.layout.subjects
        self.refined = torch.stack([
            refined_subject_masks(self_maps[i], cross_maps[i], boxes, existing[i], grid, clusters, config)
            for i in range(self_maps.shape[0])
        ])
        self.refined_grid = grid
        self.refinements.append(step)
        self._cache.clear()

    def regions_for(self, call: AttentionCall, device) -> torch.Tensor:
        """The subjects' regions on this call's grid: `[S, N]` boxes, or `[images, S, N]` refined masks."""
        if self.refined is None:
            return box_masks(self.layout.boxes, call.height, call.width, device)
        if self.refined.shape[0] != call.layout.images:
            raise ValueError(f"bounded attention: refined masks for {self.refined.shape[0]} image(s), but this call "
                             f"has {call.layout.images}; begin_run() must start every sampling run")
        return resize_regions(self.refined, self.refined_grid, (call.height, call.width)).to(device)

    # -- masks ---------------------------------------------------------------

    def mask_for(self, call: AttentionCall, keys: int, dtype, device) -> torch.Tensor | None:
        """The additive mask of this call: self `[1|B, 1, N, N]`, cross `[B, 1, N, K]` (zero on unconditional rows).

        Box regions are the same for every image; refined ones are per image, so
        the self mask then has a row per batch row (unless there is one image).
        """
        guiding = self.collected is not None
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

    def wants(self, call: AttentionCall) -> bool:
        return self.masks or (self.collected is not None and call.layer in self.loss_layers)

    def loss_call(self, call: AttentionCall) -> bool:
        """Whether this call's probabilities feed the guidance loss (a guidance pass, a loss layer of the loss's kind)."""
        return (self.collected is not None and call.layer in self.loss_layers
                and ("self" if call.is_self else "cross") in self.loss.kinds)

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        self.refresh_regions(call.step)
        loss_call = self.loss_call(call)
        if self.masks and call.is_self and not loss_call and not self.inner_needs_whole_call(call):
            return self.grouped_self_attention(q, k, v, call, attend, mask)
        if self.masks:
            mask = combine_masks(mask, self.mask_for(call, k.shape[1], q.dtype, q.device))
        if not loss_call:
            return attend(q, k, v, mask)
        probs = attention_probabilities(q, k, call.heads, mask)
        rows = torch.tensor(call.layout.rows(cond=True), device=q.device)
        self.collected.append(LayerProbs.from_heads(call.is_self, call.height, call.width, probs.index_select(0, rows),
                                                    keep_heads=getattr(self.loss, "per_head", False)))
        if (call.ordinal, call.is_self) == self._last_loss_call:
            raise LossLayersDone
        return merge_heads(probs.to(v.dtype) @ split_heads(v, call.heads))

    def inner_needs_whole_call(self, call: AttentionCall) -> bool:
        if self.inner_wants is not None:
            return self.inner_wants(call)
        return self.recorder is not None and self.recorder.wants(call)

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

    # -- guidance passes -----------------------------------------------------

    def guides(self, step: int | None) -> bool:
        return self.guidance is not None and step is not None and step < self.guidance.steps

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


def guided_latent(forward: Callable[[torch.Tensor], None], technique: BoundedAttention, z: torch.Tensor,
                  step: int, ordinals: dict, preconditioner: torch.Tensor | float = 1.0):
    """Bounded guidance at one step: `z ← z − η_i·P·∇_z L`, up to `iterations` times.

    `forward(z)` runs the UNet on z (its loss layers fill the technique's pass and
    stop it with `LossLayersDone`). `P` converts the step to the space the authors
    step in (the UNet's input scaling, see nodes/bounded.py). The authors update
    after every loss, and stop once a loss (normalised by B·S) is below the
    threshold. Returns (new z detached, the normalised losses); no graph survives.
    """
    config = technique.guidance
    eta = config.step_size(step)
    losses = []
    with autograd_enabled():
        z = z.detach().clone()
        for _ in range(config.iterations):
            z.requires_grad_(True)
            with technique.guide_pass(ordinals) as collected:
                try:
                    forward(z)
                except LossLayersDone:
                    pass
                loss, normalized = technique.loss(list(collected), technique.layout)
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
