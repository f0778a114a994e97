"""Segmentation, labels, heat maps and PCA from recorded attention maps.

Local-prompt-mixing's segmentation (docs/methods.md §4): KMeans on the rows of the
head/layer/step-averaged self-attention map (each token's row says where it
looks; tokens of one object look alike), then each cluster is labelled with
the prompt word whose normalised cross-attention map is highest on average
over the cluster, or background when no word reaches the threshold.

As the authors' code: 5 clusters, n_init 10, seed 1, the noun map normalised as
`(m − |min m|) / max m`, enlarged by repetition onto the cluster grid, a segment's
score the mean over it, background at a best score of at most 0.35. Which maps
are read is chosen by role, not by token count (nodes/segment.py): the authors
cluster the largest self-attention grid their store keeps (32² of SD1.4 at 512
px: every level but the highest) and label with the level below (16²). On the
demo model at 128 px those roles are 8² and 4²; its 4² maps are too coarse to
place a word on an object (AUC 0.5 against the objects, 8²: 0.9), so the label
grid falls back to the cluster grid there.

Where the pack differs: the authors repeat each token's cell to make the masks,
so an edge can only fall on the token grid. By default (`segment_memberships`,
`smooth_labels`) each token's self-attention row is unmixed into the segments'
mean rows and those shares, bilinearly enlarged, give each pixel its segment:
an object a few tokens wide is cut inside the cells it half covers. On the demo
model (objects 1-20% of the image, 1-13 cells of its 8² grid) this raises the
word masks' mIoU by 0.02-0.04 and the best segment's by 0.03-0.05 on every
image set measured; the labels are the paper's either way. Measured limit there:
even each 8² cell's true coverage, enlarged the same way, reaches about 0.6 mIoU
(benchmarks/quality.py's ceiling row), and the demo model's 16² self-attention
is near-uniform (an object's tokens give their object 1.6x the uniform share),
so KMeans on it scatters the background; finer masks need a finer attention grid.

Plain torch/numpy/scikit-learn/PIL; the token↔word mapping of a real tokenizer
is done by the caller, which passes each word's token positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .words import Word, is_function_word, missing_words, word_positions

BACKGROUND = "background"


# -- words ------------------------------------------------------------------------


def select_words(words: list[Word], requested: str) -> dict[str, tuple[int, ...]]:
    """Token positions of each requested word (comma-separated; an entry may be several words).

    Every occurrence of a word in the prompt counts. Empty `requested` gives
    every word of the prompt except function words (`words.FUNCTION_WORDS`); text that names no word
    (",,,", " , ") is refused rather than read as empty. Raises ValueError
    naming a word that is not in the prompt and listing the prompt's words.
    """
    entries = [e.strip().lower() for e in requested.split(",") if e.strip()]
    if requested.strip() and not any(re.search(r"\w", e) for e in entries):
        raise ValueError(
            f"words: {requested!r} names no word (only commas, spaces or punctuation); give comma-separated prompt "
            "words, or leave it empty for every word of the prompt except function words"
        )
    if not entries:
        entries = list(dict.fromkeys(w.text for w in words if not is_function_word(w.text)))
        if not entries:
            raise ValueError("the prompt has no words to label segments with (only function words or none)")
    selected = {}
    for entry in entries:
        missing = missing_words(words, entry)
        if missing:
            listed = ", ".join(dict.fromkeys(w.text for w in words)) or "(none)"
            raise ValueError(f"words: '{missing[0]}' is not in the prompt; the prompt's words are: {listed}")
        positions = word_positions(words, entry)
        if not positions:
            raise ValueError(f"words: '{entry}' has no letters or digits")
        selected[entry] = positions
    return selected


def fold_repeated_context(cross: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """Cross maps over the prompt's own tokens: `[..., K]` -> `[..., prompt_tokens]`.

    ComfyUI repeats a text context to the least common multiple of the batch's
    context lengths; a token then has K/prompt_tokens copies whose
    probabilities add up.
    """
    keys = cross.shape[-1]
    if keys % prompt_tokens:
        raise ValueError(
            f"the recorded cross-attention has {keys} text tokens, the prompt {prompt_tokens}: "
            "the text given here is not the one the sampled conditioning was encoded from"
        )
    return cross.reshape(*cross.shape[:-1], keys // prompt_tokens, prompt_tokens).sum(-2)


# -- maps on grids ---------------------------------------------------------------


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[h, w]` -> `[H, W]`: nearest when enlarging (each cell repeated, as the paper's
    ×2 repeat), area mean when shrinking."""
    if tuple(m.shape) == tuple(size):
        return m
    mode = "nearest" if size[0] >= m.shape[0] and size[1] >= m.shape[1] else "area"
    return F.interpolate(m[None, None].float(), size=tuple(size), mode=mode)[0, 0]


def normalise_word_map(m: torch.Tensor) -> torch.Tensor:
    """local-prompt-mixing's normalisation of a noun map: `(m − |min m|) / max m`."""
    return (m - m.min().abs()) / m.max()


def word_maps(cross: torch.Tensor, grid: tuple[int, int], words: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Each word's cross-attention map `[h, w]`: the sum of its tokens' columns of `cross` `[HW, K]`."""
    return {word: cross[:, list(positions)].sum(-1).reshape(grid) for word, positions in words.items()}


# -- segmentation -----------------------------------------------------------------


def kmeans_segments(self_attention: torch.Tensor, grid: tuple[int, int], clusters: int = 5, seed: int = 1) -> torch.Tensor:
    """KMeans (n_init 10, seeded) on the rows of a self-attention map `[HW, HW]` -> labels `[h, w]`.

    Labels are renumbered in raster order of first appearance, so the same
    partition always gets the same numbers; an empty cluster leaves no label.
    """
    from sklearn.cluster import KMeans

    tokens = grid[0] * grid[1]
    if self_attention.shape != (tokens, tokens):
        raise ValueError(f"self-attention map of shape {tuple(self_attention.shape)} is not {tokens}x{tokens} ({grid[0]}x{grid[1]} grid)")
    if not 1 <= clusters <= tokens:
        raise ValueError(f"segments: need between 1 and {tokens} (the tokens of the {grid[0]}x{grid[1]} grid), got {clusters}")
    rows = self_attention.double().numpy()
    raw = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(rows).labels_
    order = {c: i for i, c in enumerate(dict.fromkeys(raw.tolist()))}
    return torch.tensor([order[c] for c in raw.tolist()]).reshape(grid)


@dataclass(frozen=True)
class SegmentLabel:
    segment: int
    word: str  # a prompt word, or BACKGROUND
    score: float  # the winning word's score (also reported for background)
    scores: dict = field(default_factory=dict)  # every word's score on this segment


def label_segments(labels: torch.Tensor, maps: dict[str, torch.Tensor], threshold: float = 0.35) -> list[SegmentLabel]:
    """Label each segment with the word whose normalised map has the highest mean over it.

    `maps` are raw word maps on any grid; each is resized to the label grid and
    normalised (`normalise_word_map`). A segment whose best score is not above
    `threshold` is background.
    """
    normalised = {w: normalise_word_map(resize_map(m.float(), tuple(labels.shape))) for w, m in maps.items()}
    result = []
    for segment in range(int(labels.max()) + 1):
        inside = labels == segment
        scores = {w: float(m[inside].mean()) for w, m in normalised.items()}
        best = max(scores, key=scores.get) if scores else None
        score = scores[best] if best is not None else 0.0
        word = best if best is not None and score > threshold else BACKGROUND
        result.append(SegmentLabel(segment, word, score, scores))
    return result


def segment_memberships(self_attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each token's share of every segment `[S, h, w]` (non-negative, summing to 1 per token).

    A token on an object's edge covers part of the object and part of its surroundings, and
    its self-attention row is then a mixture of their rows. The shares are that mixture: the
    token's row `[HW]` of `self_attention` `[HW, HW]` written as the closest non-negative
    combination, summing to 1, of the segments' mean rows (KMeans' centroids). A token
    that looks like its own segment's centroid gets a share near 1 of it. A segment with no
    token gets no share.
    """
    from scipy.optimize import nnls

    grid = tuple(labels.shape)
    flat = labels.reshape(-1)
    count = int(labels.max()) + 1
    rows = self_attention.double()
    present = [s for s in range(count) if bool((flat == s).any())]
    centroids = torch.stack([rows[flat == s].mean(0) for s in present])  # [S', HW]
    # the sum-to-one constraint as one heavily weighted extra equation: attention rows and their means
    # already sum to 1, so it only decides between mixtures the rows themselves cannot tell apart
    weight = 10.0 * float(centroids.norm(dim=1).mean())
    system = torch.cat([centroids.T, torch.full((1, len(present)), weight, dtype=torch.float64)]).numpy()
    targets = torch.cat([rows, torch.full((rows.shape[0], 1), weight, dtype=torch.float64)], 1).numpy()
    shares = torch.zeros(count, rows.shape[0], dtype=torch.float64)
    for token in range(rows.shape[0]):
        mixture = torch.from_numpy(nnls(system, targets[token])[0])
        total = float(mixture.sum())
        if total > 0:
            shares[present, token] = mixture / total
        else:
            shares[int(flat[token]), token] = 1.0
    return shares.reshape(count, *grid).float()


def smooth_labels(memberships: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Segment labels at image size `[H, W]` from the tokens' shares `[S, h, w]`: the shares bilinearly
    enlarged, each pixel taking the segment with the largest share there, so that an edge falls inside
    a cell where the tokens' mixtures put it rather than on the cell's border."""
    big = F.interpolate(memberships[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return big.argmax(0)


def upsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Segment labels `[h, w]` at image size `[H, W]` (nearest: every pixel keeps one label)."""
    return F.interpolate(labels[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()


def segment_masks(labels: torch.Tensor, size: tuple[int, int], big: torch.Tensor | None = None) -> torch.Tensor:
    """One mask per segment at `size` `[S, H, W]` (0/1); they partition the image. `big`: the labels already
    at `size` (`smooth_labels`); without it each cell of `labels` is repeated."""
    big = upsample_labels(labels, size) if big is None else big
    return torch.stack([(big == s).float() for s in range(int(labels.max()) + 1)])


def word_masks(masks: torch.Tensor, segment_labels: list[SegmentLabel], words: list[str]) -> torch.Tensor:
    """For each word, the union of the segments labelled with it `[W, H, W]` (empty if none)."""
    out = torch.zeros(len(words), *masks.shape[1:])
    for i, word in enumerate(words):
        for label in segment_labels:
            if label.word == word:
                out[i] = torch.maximum(out[i], masks[label.segment])
    return out


def describe_labels(segment_labels: list[SegmentLabel]) -> str:
    """One line per segment: `0: cat 0.65 (cat 0.65, sunglasses 0.19)`, `1: background (cat 0.21, ...)`."""
    lines = []
    for label in segment_labels:
        ranked = sorted(label.scores.items(), key=lambda kv: -kv[1])
        detail = ", ".join(f"{w} {s:.2f}" for w, s in ranked)
        head = f"{label.word} {label.score:.2f}" if label.word != BACKGROUND else BACKGROUND
        lines.append(f"{label.segment}: {head} ({detail})")
    return "\n".join(lines)


# -- PCA ---------------------------------------------------------------------------


def pca_rgb(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The first three principal components of per-token features `[HW, D]` as RGB `[h, w, 3]` in [0, 1].

    Each component is min-max scaled on its own (Plug-and-Play's visualisation). Its sign is
    chosen so that the tokens far from the bulk are bright (the component's mean lies above its
    median: a right-skewed component): objects covering a minority of the image come out light on
    a dark background, whichever way the SVD happened to point, which also makes the colours
    deterministic.
    """
    x = features.double()
    x = x - x.mean(0, keepdim=True)
    vh = torch.linalg.svd(x, full_matrices=False).Vh
    components = min(3, vh.shape[0])
    projected = x @ vh[:components].T
    signs = torch.where(projected.mean(0) >= projected.median(0).values, 1.0, -1.0).to(projected)
    projected = projected * signs
    rgb = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    low, high = projected.min(0).values, projected.max(0).values
    rgb[:, :components] = (projected - low) / (high - low).clamp_min(1e-12)
    return rgb.reshape(*grid, 3).float()


# -- pictures --------------------------------------------------------------------

PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
], dtype=np.float32) / 255.0


def segment_preview(labels_big: torch.Tensor, segment_labels: list[SegmentLabel], image: torch.Tensor | None = None) -> torch.Tensor:
    """A coloured segment map `[H, W, 3]` in [0, 1], blended over `image` if given, with the labels written on it."""
    from PIL import Image, ImageDraw, ImageFont

    ids = labels_big.long().numpy()
    colours = PALETTE[ids % len(PALETTE)]
    if image is not None:
        colours = 0.5 * colours + 0.5 * image.float().numpy()[..., :3]
    picture = Image.fromarray((colours * 255).round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()

    def size_of(text):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    for text, box in place_labels(ids, segment_labels, size_of):
        left, top = draw.textbbox((0, 0), text, font=font)[:2]
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((box[0] + 1 - left, box[1] + 1 - top), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(picture).astype(np.float32) / 255.0)


def place_labels(ids: np.ndarray, segment_labels: list[SegmentLabel], size_of) -> list[tuple[str, tuple]]:
    """Where `segment_preview` writes each segment's label: (text, box (x0, y0, x1, y1) with a 1-pixel margin).

    A label goes at its segment's deepest pixel (farthest from the segment's border: on the
    segment even when it is scattered), or at the deepest one whose box keeps clear of the labels
    placed before it; `size_of(text)` gives the text's (width, height).
    """
    from scipy.ndimage import distance_transform_edt

    placed = []
    for label in segment_labels:
        inside = ids == label.segment
        if not inside.any():
            continue
        text = f"{label.word} {label.score:.2f}" if label.word != BACKGROUND else BACKGROUND
        width, height = size_of(text)
        depth = distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        box = None
        for flat in np.argsort(-depth, axis=None, kind="stable")[: int(inside.sum())]:
            cy, cx = np.unravel_index(flat, inside.shape)
            x = int(np.clip(cx - width // 2, 0, max(0, ids.shape[1] - width)))
            y = int(np.clip(cy - height // 2, 0, max(0, ids.shape[0] - height)))
            candidate = (x - 1, y - 1, x + width + 1, y + height + 1)
            box = box or candidate
            if not any(candidate[0] < b[2] and b[0] < candidate[2] and candidate[1] < b[3] and b[1] < candidate[3]
                       for _, b in placed):
                box = candidate
                break
        placed.append((text, box))
    return placed


def heat_colours(m: torch.Tensor) -> torch.Tensor:
    """A map in [0, 1] `[H, W]` as colours `[H, W, 3]`: black -> red -> yellow -> white."""
    m = m.clamp(0, 1)
    return torch.stack([(3 * m).clamp(0, 1), (3 * m - 1).clamp(0, 1), (3 * m - 2).clamp(0, 1)], -1)


def heat_overlay(m: torch.Tensor, image: torch.Tensor, opacity: float = 0.6) -> torch.Tensor:
    """`image` `[H, W, 3]` with the heat colours of `m` (`[H, W]` in [0, 1]) laid over it."""
    return (1 - opacity) * image[..., :3].float() + opacity * heat_colours(m)


def min_max(m: torch.Tensor) -> torch.Tensor:
    """`m` scaled to [0, 1] (a constant map becomes 0)."""
    low, high = m.min(), m.max()
    return (m - low) / (high - low) if high > low else torch.zeros_like(m)
