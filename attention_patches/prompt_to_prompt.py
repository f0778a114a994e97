"""Prompt-to-Prompt (Hertz et al.): edit an image by editing its prompt.

The source prompt and its edits are sampled together from the same noise, in
groups of batch rows `[source, edit_1, ..., edit_n]`. In the conditional chunks
the edits' cross-attention probabilities are computed from the source's
(google/prompt-to-prompt, `AttentionControlEdit` and its subclasses):

- word swap (`AttentionReplace`): `P_e ← P_src · M`, M the authors' replacement
  mapper (identity, and a fan-out for a word whose token count changed);
- refinement (`AttentionRefine`): `P_e[:, n] ← α_n·P_src[:, mapper[n]] + (1-α_n)·P_e[:, n]`
  through the authors' global alignment of the two token sequences;
- re-weighting (`AttentionReweight`): the result times a per-token equalizer
  (any real weight, negative included);

each mixed in per token by the time window `a` of the step:
`P ← R·a + P_e·(1-a)` for the first `cross_replace_steps` of the schedule.
Self-attention maps of the source replace the edits' in the layers at the two
lowest resolutions by role (the authors: ≤ 16² tokens at 512², i.e. downsampled
≥ 4× from the latent) for the first `self_replace_steps`. Local blend keeps the
edit equal to the source outside the union of the words' cross-attention masks.

Every replacement is linear in the probabilities, `P_new = P_src·A + P_e·diag(r)`,
so the output `P_new·V_e = attend(q_src, k_src, A·V_e) + attend(q_e, k_e, r·V_e)`
runs on the fused attention kernel and no probability matrix is materialised;
local blend's maps are one more fused call whose values are the words' indicator.

Where the pack differs from the authors' code, and why:
- The replacement mapper after a word whose token count changed maps source
  token i to edit token j (the aligned pair); the authors' loop writes
  `mapper[j, j]` there, which misaligns every later token by the difference.
  For equal token counts both are the same.
- Local blend is applied to the denoised estimate the sampler receives at each
  step rather than to x_t after the step: a GUIDER cannot change a sampler's
  state, but every sampler's last step returns the last denoised estimate, so
  the final image equals the source exactly outside the mask, for any sampler.
- Local blend reads the encoder/decoder cross-attention layers whose token
  grid is nearest 16² (chosen at the first step from the grids the model has),
  the grid the authors' 3×3 dilation and 0.3 threshold were tuned on: at 512²
  on SD1.5 those are the authors' layers; on a small latent (the demo model's
  16²) the by-role rule would give 4×4 maps that cover the whole image.
- Time windows come from the sampler's schedule (step index of σ), so a
  window means the same fraction whatever the sampler and step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .router import AttentionTechnique, combine_masks

CROSS_REPLACE_STEPS = 0.8  # the authors' notebook examples (cat -> dog etc.)
SELF_REPLACE_STEPS = 0.4
BLEND_THRESHOLD = 0.3
BLEND_POOL = 1  # k of the authors' max_pool2d((2k+1)², stride 1, padding k)
SELF_MIN_DOWNSAMPLE = 4  # ≤ 16² tokens at a 64² latent: the two lowest resolutions
BLEND_SIDE = 16  # the authors' blend maps: the 16² encoder/decoder cross-attention layers (at 512²)

# -- the authors' alignment (seq_aligner.py) ------------------------------------------------------


def global_align(x: Sequence[int], y: Sequence[int], gap: int = 0, match: int = 1, mismatch: int = -1):
    """Needleman-Wunsch traceback of the authors' `global_align` (score gap 0, match 1, mismatch -1)."""
    trace = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    score = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    score[0, 1:] = (np.arange(len(y)) + 1) * gap
    score[1:, 0] = (np.arange(len(x)) + 1) * gap
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = score[i, j - 1] + gap
            up = score[i - 1, j] + gap
            diag = score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i, j] = max(left, up, diag)
            trace[i, j] = 1 if score[i, j] == left else (2 if score[i, j] == up else 3)
    return trace


def refinement_mapper(source: Sequence[int], edit: Sequence[int], max_len: int = 77):
    """(mapper [max_len] long, alphas [max_len]): the authors' `get_mapper` on token id sequences
    (start and end tokens included). Edit token n takes the source token mapper[n]; alphas[n] = 0
    where token n has no source counterpart (an added word), whose own map is kept."""
    trace = global_align(source, edit)
    i, j, pairs = len(source), len(edit), []
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    base = torch.tensor(pairs[::-1], dtype=torch.int64).reshape(-1, 2)
    alphas = torch.ones(max_len)
    alphas[: base.shape[0]] = base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: base.shape[0]] = base[:, 1]
    mapper[base.shape[0]:] = len(edit) + torch.arange(max_len - len(edit))
    return mapper, alphas


Words = Sequence[tuple[str, Sequence[int]]]  # (text, token positions) in prompt order


def replacement_mapper(source_words: Words, edit_words: Words, max_len: int = 77) -> torch.Tensor:
    """[max_len, max_len] `M` of the authors' `get_replacement_mapper_`: source token w feeds edit token n
    with weight M[w, n]. Words are (text, token positions) in prompt order; the prompts must have as many
    words. A swapped word with another token count fans out with weight 1/len(edit tokens)."""
    if len(source_words) != len(edit_words):
        raise ValueError(f"a word swap needs prompts with the same number of words, but the source has "
                         f"{len(source_words)} and the edit {len(edit_words)}")
    swaps = [(list(s[1]), list(e[1])) for s, e in zip(source_words, edit_words) if s[0] != e[0]]
    mapper = torch.zeros(max_len, max_len)
    i = j = current = 0
    while i < max_len and j < max_len:
        if current < len(swaps) and swaps[current][0][0] == i:
            src, dst = swaps[current]
            if len(src) == len(dst):
                mapper[src, dst] = 1
            else:
                for t in dst:
                    mapper[src, t] = 1 / len(dst)
            current += 1
            i += len(src)
            j += len(dst)
        else:
            mapper[i, j] = 1
            i += 1
            j += 1
    return mapper


def refinement_matrix(mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """`G·diag(α)` with G[w, n] = [w == mapper[n]], so that `P_src·G·diag(α) = α·P_src[:, mapper]`."""
    max_len = mapper.shape[0]
    g = torch.zeros(max_len, max_len)
    valid = (mapper >= 0) & (mapper < max_len) & (alphas > 0)
    cols = torch.arange(max_len)[valid]
    g[mapper[valid], cols] = 1
    return g * alphas[None, :]


def time_window(fraction, steps: int) -> tuple[int, int]:
    """Authors' `update_alpha_time_word`: a float f is (0, f); bounds scale by steps (+1 for cross)."""
    start, end = (0.0, float(fraction)) if isinstance(fraction, (int, float)) else map(float, fraction)
    return int(start * steps), int(end * steps)


# -- the technique ------------------------------------------------------------------------------


@dataclass
class PromptEdit:
    """One edited prompt's controls, all over the context's K token positions.

    `matrix` A [K, K] and `residual` r [K] give the replaced cross-attention
    `P_src·A + P_e·diag(r)` (word swap: A = M, r = 0; refinement: A = G·diag(α),
    r = 1 - α), before the equalizer. `equalizer` [K] scales each token's map;
    `cross_windows` is the default (start, end) fraction followed by per-token
    windows (positions, (start, end)) that override it for those tokens.
    """

    matrix: torch.Tensor
    residual: torch.Tensor
    equalizer: torch.Tensor
    cross_windows: list = field(default_factory=lambda: [(None, (0.0, CROSS_REPLACE_STEPS))])

    def time_alpha(self, step: int, total: int) -> torch.Tensor:
        """[K] 1 where this token's map is replaced at `step` (of `total`), as the authors' alpha_time_words."""
        alpha = torch.zeros(self.matrix.shape[0])
        for positions, bounds in self.cross_windows:
            start, end = time_window(bounds, total + 1)
            index = slice(None) if positions is None else list(positions)
            alpha[index] = 1.0 if start <= step < end else 0.0
        return alpha


class PromptToPrompt(AttentionTechnique):
    """Prompt-to-Prompt over groups of rows `[source, edit_1..edit_n]` of every conditional chunk.

    `blend_words[g]` [K] marks the words of group member g whose cross-attention
    maps make its local-blend mask (all zeros: no blend words in that prompt).
    """

    name = "prompt_to_prompt"
    order = 40

    def __init__(self, edits: Sequence[PromptEdit], self_replace_steps=SELF_REPLACE_STEPS,
                 blend_words: torch.Tensor | None = None, blend_threshold: float = BLEND_THRESHOLD,
                 self_min_downsample: int = SELF_MIN_DOWNSAMPLE, blend_side: int = BLEND_SIDE):
        if not edits:
            raise ValueError("Prompt-to-Prompt needs at least one edited prompt")
        self.edits = list(edits)
        self.group = len(self.edits) + 1
        self.self_replace_steps = self_replace_steps
        self.blend_words = blend_words if blend_words is not None and bool(blend_words.any()) else None
        self.blend_threshold = blend_threshold
        self.self_min_downsample = self_min_downsample
        self.blend_side = blend_side
        self.blend_grid: tuple[int, int] | None = None
        self.grid_maps: dict = {}  # (h, w) -> [images, h, w], summed over layers, heads and steps
        self.last_blend_mask: torch.Tensor | None = None  # [images, 1, H, W] of the latest `blend`, on the CPU

    def begin(self) -> None:
        """Forget the blend maps of a previous sampling run."""
        self.blend_grid, self.grid_maps, self.last_blend_mask = None, {}, None

    def edit_masks(self, images: int, latent_size: tuple[int, int]) -> torch.Tensor:
        """[images × edits, H, W]: where each edit may differ from its source at the last step's blend, per
        image then per edit; all ones without local blend (the edit applies everywhere)."""
        if self.blend_words is None:
            return torch.ones(images * (self.group - 1), *latent_size)
        mask = self.last_blend_mask
        if mask is None or mask.shape[0] != images * self.group or tuple(mask.shape[-2:]) != tuple(latent_size):
            have = "nothing" if mask is None else f"{mask.shape[0] // self.group} image(s) of {tuple(mask.shape[-2:])}"
            raise ValueError(f"local blend: its last run sampled {have}, not {images} image(s) of {tuple(latent_size)}")
        return mask.reshape(images, self.group, *mask.shape[-2:])[:, 1:].reshape(-1, *mask.shape[-2:])

    @property
    def blend_maps(self) -> torch.Tensor | None:
        return self.grid_maps.get(self.blend_grid) if self.blend_grid is not None else None

    # -- which calls ---------------------------------------------------------------------------

    @staticmethod
    def downsample(call) -> int | None:
        latent = call.options.get("original_shape")
        if latent is None:
            return None
        return max(1, round(latent[-2] / call.height))

    def _self_active(self, call) -> bool:
        factor = self.downsample(call)
        if factor is None or factor < self.self_min_downsample:
            return False
        start, end = time_window(self.self_replace_steps, call.total_steps or 0)
        return start <= (call.step or 0) < end

    def _blend_layer(self, call) -> bool:
        return (self.blend_words is not None and not call.is_self and call.layer[0] != "middle"
                and (self.blend_grid is None or (call.height, call.width) == self.blend_grid))

    def wants(self, call) -> bool:
        return bool(call.layout.chunks(cond=True)) and (not call.is_self or self._self_active(call))

    # -- the call ------------------------------------------------------------------------------

    def _rows(self, call):
        """(edit rows, their source rows, edit index) over every conditional chunk."""
        images = call.layout.images
        if images % self.group:
            raise ValueError(f"Prompt-to-Prompt: {images} images per chunk do not split into groups of "
                             f"{self.group} (the source and {self.group - 1} edits)")
        edit_rows, source_rows, which = [], [], []
        for chunk in call.layout.chunks(cond=True):
            for image in range(images):
                member = image % self.group
                if member:
                    edit_rows.append(call.layout.row(chunk, image))
                    source_rows.append(call.layout.row(chunk, image - member))
                    which.append(member - 1)
        return edit_rows, source_rows, which

    def __call__(self, q, k, v, call, attend, mask=None):
        if self._blend_layer(call):
            self._record_blend_maps(q, k, call, attend, mask)
        edit_rows, source_rows, which = self._rows(call)
        if call.is_self:
            # P_src·V_e: the source's queries and keys, the edit's values.
            q2, k2 = q.clone(), k.clone()
            q2[edit_rows], k2[edit_rows] = q[source_rows], k[source_rows]
            return attend(q2, k2, v, mask)
        step, total = call.step or 0, call.total_steps or 0
        tokens = k.shape[1]
        matrices, residuals = [], []
        for e in which:
            edit = self.edits[e]
            if edit.matrix.shape[0] != tokens:
                raise ValueError(f"Prompt-to-Prompt: the edit controls cover {edit.matrix.shape[0]} tokens, the "
                                 f"conditioning has {tokens}")
            a = edit.time_alpha(step, total)
            matrices.append(edit.matrix * (edit.equalizer * a)[None, :])
            residuals.append(edit.residual * edit.equalizer * a + (1 - a))
        if not any(bool(m.any()) for m in matrices):
            return attend(q, k, v, mask)  # no token replaced at this step: the edits' own attention
        dtype, device = v.dtype, v.device
        matrix = torch.stack(matrices).to(device, torch.float32)
        residual = torch.stack(residuals).to(device, torch.float32)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[edit_rows], k2[edit_rows] = q[source_rows], k[source_rows]
        v_edit = v[edit_rows].float()
        v2[edit_rows] = torch.einsum("bwn,bnc->bwc", matrix, v_edit).to(dtype)
        out = attend(q2, k2, v2, mask)
        keep = residual.abs().amax(-1) > 0
        if bool(keep.any()):
            rows = [r for r, kept in zip(edit_rows, keep.tolist()) if kept]
            v_res = (v_edit[keep] * residual[keep][:, :, None]).to(dtype)
            out = out.clone()
            out[rows] = out[rows] + attend(q[rows], k[rows], v_res, _rows_of(mask, rows, q.shape[0]))
        return out

    def _record_blend_maps(self, q, k, call, attend, mask) -> None:
        """Add Σ_heads P·w (w: the blend words' indicator) of every conditional row to the blend maps."""
        layout, heads = call.layout, call.heads
        rows = layout.rows(cond=True)
        images = layout.images
        member = torch.tensor([r % layout.images % self.group for r in rows])
        words = self.blend_words.to(q.device, torch.float32)[member]  # [rows, K]
        dim = q.shape[-1] // heads
        values = torch.zeros(len(rows), k.shape[1], heads, dim, device=q.device, dtype=q.dtype)
        values[..., 0] = words[:, :, None].to(q.dtype)
        values = values.reshape(len(rows), k.shape[1], heads * dim)
        maps = attend(q[rows], k[rows], values, _rows_of(mask, rows, q.shape[0]))
        maps = maps.reshape(len(rows), -1, heads, dim)[..., 0].float().sum(-1)  # [rows, N]
        maps = maps.reshape(len(rows) // images, images, call.height, call.width).sum(0)
        grid = (call.height, call.width)
        previous = self.grid_maps.get(grid)
        self.grid_maps[grid] = maps if previous is None or previous.shape != maps.shape else previous + maps

    # -- local blend ---------------------------------------------------------------------------

    def blend_mask(self, latent_size: tuple[int, int]) -> torch.Tensor | None:
        """[images, 1, H, W] float mask of the authors' LocalBlend, or None without blend words.

        Each row's word map is max-pooled (3×3), resized to the latent, divided by
        its maximum and thresholded; an edit's mask is the union of its own and
        its source's, the source's is its own.
        """
        if self.blend_words is None:
            return None
        if self.blend_grid is None and self.grid_maps:
            # nearest to blend_side² in log scale; a tie goes to the coarser grid
            target = math.log(self.blend_side ** 2)
            self.blend_grid = min(self.grid_maps, key=lambda g: (abs(math.log(g[0] * g[1]) - target), g[0] * g[1]))
            self.grid_maps = {self.blend_grid: self.grid_maps[self.blend_grid]}
        if self.blend_maps is None:
            raise RuntimeError("Prompt-to-Prompt: local blend found no cross-attention maps: the model has no "
                               "encoder/decoder cross-attention layers")
        k = BLEND_POOL
        maps = F.max_pool2d(self.blend_maps[:, None], (2 * k + 1, 2 * k + 1), (1, 1), padding=(k, k))
        maps = F.interpolate(maps, size=tuple(latent_size))
        peak = maps.amax(dim=(2, 3), keepdim=True)
        mask = (maps / peak.clamp_min(torch.finfo(maps.dtype).tiny)).gt(self.blend_threshold)
        groups = mask.reshape(-1, self.group, *mask.shape[1:])
        groups = groups | groups[:, :1]
        return groups.reshape(mask.shape).float()

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """`x_src + mask·(x - x_src)` per group, rows of x as one chunk's images; x unchanged without blend words."""
        mask = self.blend_mask(tuple(x.shape[-2:]))
        if mask is None:
            return x
        self.last_blend_mask = mask.detach().cpu()
        groups = x.reshape(-1, self.group, *x.shape[1:])
        mask = mask.to(x.device, x.dtype).reshape(-1, self.group, *mask.shape[1:])
        source = groups[:, :1]
        return (source + mask * (groups - source)).reshape(x.shape)


def _rows_of(mask, rows, batch):
    """The rows of an additive mask that has a batch axis, or the mask itself when it broadcasts."""
    if mask is None or mask.dim() < 3 or mask.shape[0] != batch:
        return mask
    return mask[rows]


def word_equalizer(positions_and_weights, tokens: int = 77) -> torch.Tensor:
    """The authors' `get_equalizer`: ones, with each word's token positions set to its weight."""
    equalizer = torch.ones(tokens)
    for positions, weight in positions_and_weights:
        equalizer[list(positions)] = float(weight)
    return equalizer


def swap_edit(source_words, edit_words, tokens: int = 77, **controls) -> PromptEdit:
    mapper = replacement_mapper(source_words, edit_words, tokens)
    return PromptEdit(matrix=mapper, residual=torch.zeros(tokens),
                      equalizer=controls.pop("equalizer", torch.ones(tokens)), **controls)


def refine_edit(source_ids, edit_ids, tokens: int = 77, **controls) -> PromptEdit:
    mapper, alphas = refinement_mapper(source_ids, edit_ids, tokens)
    return PromptEdit(matrix=refinement_matrix(mapper, alphas), residual=1 - alphas,
                      equalizer=controls.pop("equalizer", torch.ones(tokens)), **controls)


__all__ = ["PromptToPrompt", "PromptEdit", "swap_edit", "refine_edit", "replacement_mapper", "refinement_mapper",
           "refinement_matrix", "word_equalizer", "combine_masks"]
