"""Bounded Attention's layout: the subjects' tokens and boxes, and the masks they give (docs/methods.md §3).

Cross-attention, conditional rows only: subject and filter token columns are
closed; subject s's columns reopen for the queries inside s's region; while
denoising, background queries also lose EOS. During a guidance pass the
background keeps EOS and sees every subject's tokens (the authors' `optimized`
phase). Self-attention, every row: a query inside subject s attends to
background keys and keys of the subjects containing it; background queries are
unrestricted. Masks are added to the logits with `mask_min` (finfo.min) rather
than -inf.

Boxes are `[x0, y0, x1, y1]`, normalised, origin top-left. Token indices are
positions in one 77-token chunk of the prompt (SOT = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..backend import mask_min

CHUNK_TOKENS = 77  # one CLIP text chunk; longer contexts repeat the chunk layout


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

