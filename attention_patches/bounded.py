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

Boxes are `[x0, y0, x1, y1]`, normalised, origin top-left. Token indices are
positions in one 77-token chunk of the prompt (SOT = 0).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .backend import mask_min, merge_heads, split_heads
from .call import AttentionCall, Layer
from .router import AttentionTechnique, combine_masks

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
    Python's round (half to even), exactly as the authors rasterise boxes.
    """
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool, device=device)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = True
    return masks.flatten(1)


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
    """Head-summed attention probabilities of one loss layer, conditional rows: `[B, N, K]`."""

    is_self: bool
    height: int
    width: int
    probs: torch.Tensor


def region_sums(probs: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`[B, S]`: Σ_{i ∈ queries_s, j ∈ keys_s} probs[b, i, j]; queries `[S, N]`, keys `[S, K]` (bool)."""
    return torch.einsum("bnk,sn,sk->bs", probs, queries.to(probs.dtype), keys.to(probs.dtype))


def bounded_shares(layer: LayerProbs, layout: BoundedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(fg, bg) `[B, S]` of one layer (methods.md §3).

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


class LayoutGuidanceLoss:
    """Layout Guidance (Chen et al., backward guidance), on the same loss layers' cross-attention.

    Per layer, subject s and token t ∈ T_s: r = Σ_{i∈B_s} A[i, t] / Σ_i A[i, t];
    L = Σ_layers Σ_s Σ_t mean_b (1 − r)² / S (their code's sum over layers and
    tokens, divided by the number of objects). Normalised by the number of layers
    and tokens for the stop test.
    """

    name = "layout_guidance"
    kinds = frozenset({"cross"})

    def __call__(self, layers: list[LayerProbs], layout: BoundedLayout):
        loss, terms = 0.0, 0
        for layer in (l for l in layers if not l.is_self):
            boxes = box_masks(layout.boxes, layer.height, layer.width, layer.probs.device).to(layer.probs.dtype)
            inside = torch.einsum("bnk,sn->bsk", layer.probs, boxes)
            total = layer.probs.sum(1)  # [B, K]
            for s, tokens in enumerate(layout.subject_tokens):
                ratio = inside[:, s, list(tokens)] / total[:, list(tokens)]
                loss = loss + ((1 - ratio) ** 2).mean(0).sum() / layout.subjects
                terms += len(tokens)
        if not terms:
            raise ValueError("layout guidance loss: no cross-attention loss layer ran")
        return loss, loss * layout.subjects / terms


def gaussian_smooth(maps: torch.Tensor, kernel: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Attend-and-Excite's smoothing of `[M, H, W]` maps (reflect padding)."""
    x = torch.arange(kernel, dtype=maps.dtype, device=maps.device) - (kernel - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
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
            raise ValueError(f"guidance loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.steps < 0 or self.iterations < 1:
            raise ValueError(f"guidance needs steps >= 0 and iterations >= 1, got {self.steps}, {self.iterations}")

    def step_size(self, step: int) -> float:
        """η_i = η0 + (η1 − η0)·i/steps."""
        return self.step_size_start + (self.step_size_end - self.step_size_start) * step / self.steps

    def make_loss(self):
        if self.loss == "bounded":
            return BoundedLoss(self.cross_loss_scale, self.self_loss_scale)
        return LOSSES[self.loss]()


# -- the technique -------------------------------------------------------------------


class LossLayersDone(Exception):
    """Raised inside a guidance pass once the last loss layer ran: the rest of the UNet is not needed."""


def head_sum_probabilities(q, k, heads: int, mask=None) -> torch.Tensor:
    """`softmax(QKᵀ/√d + mask)` per head, float32: `[B, H, Nq, Nk]` (kept for autograd in guidance passes)."""
    q, k = split_heads(q.float(), heads), split_heads(k.float(), heads)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + (mask if mask.ndim == 4 else mask.unsqueeze(-3)).float()
    return logits.softmax(-1)


class BoundedAttention(AttentionTechnique):
    """The bounded masks in every layer, and the loss layers' probabilities during guidance passes.

    `guide_pass()` opens a guidance pass: loss layers compute their attention
    here (with grad), and the last one raises `LossLayersDone`. Mask caches
    are per (grid, keys, dtype, device, layout, phase) and hold only the
    current run's shapes.
    """

    name = "bounded_attention"
    order = 40  # outside recorders and other map readers: they see the bounded masks

    def __init__(self, layout: BoundedLayout, loss_layers=frozenset(), guidance: GuidanceConfig | None = None,
                 mask_eos: bool = True, masks: bool = True):
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

    # -- masks ---------------------------------------------------------------

    def mask_for(self, call: AttentionCall, keys: int, dtype, device) -> torch.Tensor | None:
        """The additive mask of this call: self `[1, 1, N, N]`, cross `[B, 1, N, K]` (zero on unconditional rows)."""
        guiding = self.collected is not None
        key = (call.is_self, call.height, call.width, keys, dtype, device, call.layout, guiding)
        mask = self._cache.get(key)
        if mask is None:
            if len(self._cache) > 64:
                self._cache.clear()
            regions = box_masks(self.layout.boxes, call.height, call.width, device)
            if call.is_self:
                mask = additive(self_attention_allowed(regions), dtype)[None, None]
            else:
                cond = additive(cross_attention_allowed(self.layout, regions, keys, guiding, self.mask_eos), dtype)
                rows = torch.zeros(len(call.layout.cond_or_uncond) * call.layout.images, 1, *cond.shape,
                                   dtype=dtype, device=device)
                rows[call.layout.rows(cond=True)] = cond
                mask = rows
            self._cache[key] = mask
        return mask

    # -- dispatch ------------------------------------------------------------

    def wants(self, call: AttentionCall) -> bool:
        return self.masks or (self.collected is not None and call.layer in self.loss_layers)

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        if self.masks:
            mask = combine_masks(mask, self.mask_for(call, k.shape[1], q.dtype, q.device))
        if self.collected is None or call.layer not in self.loss_layers:
            return attend(q, k, v, mask)
        kind = "self" if call.is_self else "cross"
        if kind not in self.loss.kinds:
            return attend(q, k, v, mask)
        probs = head_sum_probabilities(q, k, call.heads, mask)
        rows = torch.tensor(call.layout.rows(cond=True), device=q.device)
        self.collected.append(LayerProbs(call.is_self, call.height, call.width, probs.index_select(0, rows).sum(1)))
        if (call.ordinal, call.is_self) == self._last_loss_call:
            raise LossLayersDone
        return merge_heads(probs.to(v.dtype) @ split_heads(v, call.heads))

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

    Only the copies the graph keeps live, and only until the backward pass is done.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        swap = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) and t.is_inference() else t  # noqa: E731
        return func(*tree_map(swap, args), **tree_map(swap, kwargs or {}))


@contextmanager
def autograd_enabled():
    """Leave ComfyUI's inference mode for a gradient computation with respect to the latent only."""
    with torch.inference_mode(False), torch.enable_grad(), _CloneInferenceTensors():
        yield


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
