"""Cross-Image Attention (Alaluf et al. 2024): zero-shot appearance transfer.

The output image keeps its own queries in the decoder's self-attention at the
two highest resolutions, but takes keys and values from the appearance image
(from the structure image at a few early steps), with the swapped attention
map contrasted. Two predictions per step (with and without the swap) are
blended by swap guidance, and after a set step the output latent is matched
to the appearance latent by masked AdaIN inside the objects' masks
(docs/methods.md §2, garibida/cross-image-attention).

The math is in named functions (`contrast`, `contrasted_attention`,
`swap_guidance_scales`, `masked_adain`, `label_clusters`), the step plan in
`CrossImageSchedule`, and the attention side in one stateless technique,
`CrossImageAttention`, driven by `CrossImagePass` records that the caller puts
in `transformer_options[PASS_KEY]` for each UNet call: a *source* call (the
appearance or structure latent, read from its inversion) writes the keys and
values of the swap layers into its pass; an *output* call of the same step
swaps them into the conditioning entries its pass names. Plain torch; ComfyUI
is the caller's business.

Where the authors' code and their paper differ, the default is the code, which
made the paper's figures: the swap layers act one step late (their step counter
is set after each step, see `CrossImageSchedule.attention_lag`), and a cluster
is the object when the object's noun is the best of all scored nouns on it
(`label_clusters`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .backend import merge_heads, split_heads
from .call import AttentionCall, Layer
from .router import AttentionTechnique
from .segmentation import kmeans_segments, normalise_word_map

PASS_KEY = "attention_lab.cross_image"
SOURCE, OUTPUT = "source", "output"
APPEARANCE, STRUCTURE = "appearance", "structure"

# The authors' defaults: SD1.5, 100 DDPM steps of which the first 32 are skipped,
# so 68 denoising steps; their step numbers below count those 68.
AUTHORS_STEPS = 68
CONTRAST = 1.67
SWAP_GUIDANCE = 3.5
SKIP = 0.32  # 32 of 100 steps
SWAP_START = 10 / AUTHORS_STEPS
STRUCTURE_EVERY = 5
STRUCTURE_END = 40 / AUTHORS_STEPS
ADAIN_START = 20 / AUTHORS_STEPS
SEGMENTS = 5
OBJECT_RATIO = 1.4  # a cluster is the object if its score beats 1.4x the other clusters' mean


# -- the attention map ----------------------------------------------------------------


def contrast(probs: torch.Tensor, strength: float) -> torch.Tensor:
    """The authors' attention contrasting: `clip((A − m)·γ + m, 0, 1)`, m the row mean, no renormalisation.

    Rows of a softmax sum to 1, so m = 1/N: entries above the uniform weight
    grow, those below shrink, the smallest are cut to 0.
    """
    mean = probs.mean(-1, keepdim=True)
    return ((probs - mean) * strength + mean).clamp(0.0, 1.0)


def contrasted_attention(q, k, v, heads: int, strength: float, chunk_elements: int = 2**26) -> torch.Tensor:
    """`contrast(softmax(QKᵀ/√d), γ) · V` per head, for q `[B, Nq, H*d]`, k/v `[B, Nk, H*d]`.

    The clip makes this no longer a softmax attention, so no fused backend can
    compute it: the map is formed explicitly, in float32, a block of queries at
    a time (at most `chunk_elements` logits held at once).
    """
    qh, kh, vh = (split_heads(t.float(), heads) for t in (q, k, v))
    batch, _, queries, _ = qh.shape
    out = torch.empty_like(qh)
    step = max(1, chunk_elements // (batch * heads * kh.shape[-2]))
    scale = qh.shape[-1] ** -0.5
    for start in range(0, queries, step):
        block = slice(start, min(start + step, queries))
        probs = ((qh[:, :, block] * scale) @ kh.transpose(-1, -2)).softmax(-1)
        out[:, :, block] = contrast(probs, strength) @ vh
    return merge_heads(out).to(q.dtype)


# -- swap guidance ----------------------------------------------------------------------


def swap_guidance_scales(scale: float, steps: int) -> list[float]:
    """λ_k for the denoising steps: linear from `scale` down to max(scale/2, 1) (the authors' schedule)."""
    if steps == 1:
        return [float(scale)]
    end = max(scale / 2.0, 1.0)
    return [scale + (end - scale) * k / (steps - 1) for k in range(steps)]


def swap_guided(no_swap: torch.Tensor, swap: torch.Tensor, scale: float) -> torch.Tensor:
    """`ε_noswap + λ·(ε_swap − ε_noswap)`; linear, so it holds for x0 predictions as well."""
    return no_swap + scale * (swap - no_swap)


# -- AdaIN --------------------------------------------------------------------------------


def mean_std(feat: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-5):
    """Per-channel mean and std `[C, 1, 1]` of `feat` `[C, H, W]`, over the pixels where `mask` `[H, W]` is 1.

    As the authors' `calc_mean_std`: unbiased variance, `eps` added before the root.
    """
    flat = feat.reshape(feat.shape[0], -1)
    if mask is not None:
        flat = flat[:, mask.reshape(-1) > 0.5]
    return flat.mean(1).view(-1, 1, 1), (flat.var(1) + eps).sqrt().view(-1, 1, 1)


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Content `[C, H, W]` renormalised to the style's per-channel mean and std."""
    c_mean, c_std = mean_std(content, eps=eps)
    s_mean, s_std = mean_std(style, eps=eps)
    return (content - c_mean) / c_std * s_std + s_mean


def masked_adain(content, style, content_mask, style_mask, eps: float = 1e-5) -> torch.Tensor:
    """AdaIN restricted to masks: statistics of the content inside `content_mask` are matched to
    those of the style inside `style_mask`, and only the content's masked pixels change."""
    c_mean, c_std = mean_std(content, content_mask, eps)
    s_mean, s_std = mean_std(style, style_mask, eps)
    moved = (content - c_mean) / c_std * s_std + s_mean
    m = content_mask.to(content.dtype)
    return content * (1 - m) + moved * m


# -- object masks from self-attention clusters ----------------------------------------------


def label_clusters(scores: Sequence[Sequence[float]], ratio: float = OBJECT_RATIO) -> list[int | None]:
    """Each cluster's noun (an index into its score row) or None (background), from `scores[cluster][noun]`.

    The authors' `Segmentor.cluster2noun`: a cluster's best score is the max over the nouns; the mean of
    the best scores, the single highest left out, is the bar; a cluster whose best score beats `ratio` ×
    that bar takes the noun of its best score (the first on ties, as numpy's argmax).
    """
    best = [max(row) for row in scores]
    if len(best) < 2:
        return [int(max(range(len(row)), key=lambda n: row[n])) for row in scores]
    rest = list(best)
    rest.remove(max(best))
    bar = ratio * sum(rest) / len(rest)
    return [max(range(len(row)), key=lambda n: (row[n], -n)) if max(row) > bar else None for row in scores]


def object_mask(self_attention: torch.Tensor, grid: tuple[int, int], noun_maps: torch.Tensor | Sequence[torch.Tensor],
                clusters: int = SEGMENTS, ratio: float = OBJECT_RATIO, seed: int = 1,
                object_nouns: Sequence[int] = (0,)) -> torch.Tensor:
    """The object's mask `[h, w]` (0/1) on the self-attention grid; empty if no segment is the object.

    KMeans splits the self-attention rows `[hw, hw]` into `clusters` segments;
    each is scored by the mean of every noun's normalised cross-attention map
    (resized to the grid, nearest, as the authors' ×2 repeat) inside it, and
    the segments `label_clusters` gives one of `object_nouns` (indices into
    `noun_maps`) form the mask. One map (a tensor `[h', w']`) is one noun.
    """
    if isinstance(noun_maps, torch.Tensor):
        noun_maps = [noun_maps]
    labels = kmeans_segments(self_attention, grid, clusters, seed)
    normalised = [normalise_word_map(F.interpolate(m[None, None].float(), size=grid, mode="nearest")[0, 0])
                  for m in noun_maps]
    segments = int(labels.max()) + 1
    scores = [[float(m[labels == s].mean()) for m in normalised] for s in range(segments)]
    chosen = torch.tensor([label in object_nouns for label in label_clusters(scores, ratio)])
    return chosen[labels].float()  # all zero when no segment stands out


# -- the step plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class CrossImageSchedule:
    """Which denoising steps (0 … steps−1, after the skipped ones) swap, from which image,
    with what swap guidance, and from when masked AdaIN runs. Fractions are of `steps`;
    the defaults are the authors' step numbers over their 68 steps."""

    steps: int
    swap_start: float = SWAP_START
    swap_end: float = 1.0
    structure_every: int = STRUCTURE_EVERY  # 0: keys/values always from the appearance image
    structure_end: float = STRUCTURE_END
    guidance: float = SWAP_GUIDANCE  # 1: no swap guidance (one output prediction per step)
    adain: bool = True
    adain_start: float = ADAIN_START
    # The authors' attention reads a step counter their step-end callback sets, so step k swaps as their
    # step k − 1 would (max(k − 1, 0)): no swap at step 10, the structure's keys at 11, 16, ..., 36.
    # Swap guidance and AdaIN use k itself in their code, and here. 0: the steps as the paper states them.
    attention_lag: int = 1

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps: need at least one denoising step, got {self.steps}")
        for name in ("swap_start", "swap_end", "structure_end", "adain_start"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: a fraction of the denoising steps in [0, 1], got {value}")
        if self.swap_start > self.swap_end:
            raise ValueError(f"swap_start ({self.swap_start}) is after swap_end ({self.swap_end})")
        if self.structure_every < 0:
            raise ValueError(f"structure_every: 0 (never) or a step interval, got {self.structure_every}")
        if self.guidance < 1.0:
            raise ValueError(f"swap_guidance: 1 (off) or more, got {self.guidance}")
        if self.attention_lag not in (0, 1):
            raise ValueError(f"attention_lag: 1 (the authors' step counter) or 0, got {self.attention_lag}")

    def _step(self, fraction: float) -> int:
        return int(math.floor(fraction * self.steps + 0.5))

    def attention_step(self, step: int) -> int:
        """The step number the swap layers act on at denoising step `step` (see `attention_lag`)."""
        return max(step - self.attention_lag, 0)

    def swaps(self, step: int) -> bool:
        return self._step(self.swap_start) <= self.attention_step(step) < self._step(self.swap_end)

    def source(self, step: int) -> str:
        """The image whose keys and values the output takes at a swap step."""
        start, seen = self._step(self.swap_start), self.attention_step(step)
        if self.structure_every and seen < self._step(self.structure_end) and (seen - start) % self.structure_every == 0:
            return STRUCTURE
        return APPEARANCE

    def guidance_scale(self, step: int) -> float | None:
        """λ at a swap step, or None when swap guidance is off (scale 1)."""
        if self.guidance <= 1.0:
            return None
        return swap_guidance_scales(self.guidance, self.steps)[step]

    @property
    def adain_step(self) -> int | None:
        """The step whose attention gives the masks; AdaIN follows it and every later step."""
        return self._step(self.adain_start) if self.adain and self._step(self.adain_start) < self.steps else None


# -- the technique ---------------------------------------------------------------------------


@dataclass
class CrossImagePass:
    """What one UNet call is, read by `CrossImageAttention` from `transformer_options[PASS_KEY]`.

    `role` SOURCE: the batch is the source image(s); the swap layers write their
    keys and values into `keys_values`. `role` OUTPUT: rows of the conditioning
    entries `swap_conds` (indices into the conds list the sampler passed, i.e.
    `cond_or_uncond` values) attend to the keys and values in `keys_values`;
    other rows attend as usual. The caller hands the source pass's `keys_values`
    to the output pass of the same step (`output_of`), so they live as long as
    that step and the technique itself holds no state.
    """

    role: str
    swap_conds: tuple[int, ...] = ()
    keys_values: dict = field(default_factory=dict, repr=False)  # layer -> (k, v) of the source call

    @classmethod
    def output_of(cls, source: "CrossImagePass", swap_conds: tuple[int, ...]) -> "CrossImagePass":
        """The output pass that reads what `source` stored."""
        return cls(OUTPUT, swap_conds, source.keys_values)


class CrossImageAttention(AttentionTechnique):
    """The key/value swap with contrast, in the self-attention layers `swap_layers`."""

    name = "cross_image_attention"
    order = 50

    def __init__(self, swap_layers: Sequence[Layer], contrast_strength: float = CONTRAST,
                 chunk_elements: int = 2**26):
        if contrast_strength <= 0:
            raise ValueError(f"contrast: must be positive (1 = no contrast), got {contrast_strength}")
        self.swap_layers = frozenset(map(tuple, swap_layers))
        self.contrast_strength = float(contrast_strength)
        self.chunk_elements = chunk_elements

    def wants(self, call: AttentionCall) -> bool:
        return call.is_self and tuple(call.layer) in self.swap_layers and PASS_KEY in call.options

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        step_pass: CrossImagePass = call.options[PASS_KEY]
        if step_pass.role == SOURCE:
            step_pass.keys_values[tuple(call.layer)] = (k, v)
            return attend(q, k, v, mask)
        positions = [p for p, c in enumerate(call.layout.cond_or_uncond) if c in step_pass.swap_conds]
        if not positions:
            return attend(q, k, v, mask)
        if mask is not None:
            raise ValueError(
                "CrossImageAttention: another technique masks this self-attention layer (e.g. BoundedAttentionLayout); "
                "swapped keys belong to another image, so the mask cannot apply: do not combine the two on one model"
            )
        if tuple(call.layer) not in step_pass.keys_values:
            raise RuntimeError(f"CrossImageAttention: no source keys/values stored for {call.layer} before the output call")
        k_src, v_src = step_pass.keys_values[tuple(call.layer)]
        images = call.layout.images
        if k_src.shape[0] not in (1, images):
            raise ValueError(
                f"CrossImageAttention: {k_src.shape[0]} source images for {images} output images; give 1 or {images}"
            )
        swap_rows = [call.layout.row(p, i) for p in positions for i in range(images)]
        plain_rows = [r for r in range(q.shape[0]) if r not in set(swap_rows)]
        out = torch.empty_like(q)
        if plain_rows:
            index = torch.tensor(plain_rows, device=q.device)
            out[index] = attend(q[index], k[index], v[index], None)
        index = torch.tensor(swap_rows, device=q.device)
        repeat = len(positions) * (images // k_src.shape[0])
        k_swap = k_src.to(q.dtype).repeat(repeat, 1, 1)
        v_swap = v_src.to(q.dtype).repeat(repeat, 1, 1)
        if self.contrast_strength == 1.0:
            out[index] = attend(q[index], k_swap, v_swap, None)  # no contrast: a plain attention, any backend
        else:
            out[index] = contrasted_attention(q[index], k_swap, v_swap, call.heads, self.contrast_strength,
                                              self.chunk_elements)
        return out
