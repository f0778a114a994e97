"""StyleAligned's shared attention and shared GroupNorm (Hertz et al. 2024): the math, plain torch.

The equations (docs/methods.md §1, as google/style-aligned's `sa_handler.py` computes them),
per self-attention layer, for every target image i and the reference r of its chunk:

    μ(X) = mean_N X,  σ(X) = √(var_N(X, unbiased) + 1e-5)       per head and channel
    adain(X_i, X_r) = σ(X_r)·(X_i − μ(X_i))/σ(X_i) + μ(X_r)
    Q̂_i = adain(Q_i, Q_r),  K̂_i = adain(K_i, K_r)               (V only if adain_values)
    out_i = softmax([Q̂_i K̂_iᵀ, Q̂_i (s·K_r)ᵀ + δ] / √d) · [V_i; V_r]

`s` = shared_score_scale, `δ` = shared_score_shift. The reference itself is left
alone: in the paper's code its keys are [K_r; K_r] (the scale is not applied on its
own row) with values [V_r; V_r], which gives exactly plain attention whatever δ is,
so its row is computed as plain attention. Q, K, V are `[B, N, heads*dim_head]`;
statistics per (head, channel) are per column of that layout, so no head split is
needed. Everything goes through `attend` (ComfyUI's fused attention): δ is an
additive `[1, 2N]` row broadcast over queries, never an N×2N matrix per head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .backend import mask_4d

ADAIN_EPS = 1e-5


def token_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ and σ of `x` `[B, N, C]` over tokens, per channel: `[B, 1, C]` each, at least float32.

    The reduction runs in x's dtype (CUDA accumulates half in float32); the small
    statistics are then taken to float32 so that `+ 1e-5` is not lost in fp16.
    """
    var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=1)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return mean.to(dtype), (var.to(dtype) + ADAIN_EPS).sqrt()


def adain(x: torch.Tensor, reference: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """σ(r)·(x − μ(x))/σ(x) + μ(r) for x `[S, N, C]` against reference `[1 | S, N, C]`.

    Written as one fused multiply-add `x·gain + bias` (gain = σ(r)/σ(x), bias =
    μ(r) − μ(x)·gain); `out` may be a view to write into (e.g. the first N keys).
    """
    mean, std = token_statistics(x)
    ref_mean, ref_std = token_statistics(reference)
    gain = ref_std / std
    bias = ref_mean - mean * gain
    return torch.addcmul(bias.to(x.dtype), x, gain.to(x.dtype), out=out)


@dataclass(frozen=True)
class SharedGroup:
    """One chunk's reference row and the rows that share its style."""

    reference: int
    targets: tuple[int, ...]


@dataclass(frozen=True)
class StyleAlignedOptions:
    """The paper's `StyleAlignedArgs` that act on attention, with its defaults."""

    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    shared_score_scale: float = 1.0
    shared_score_shift: float = 0.0
    full_attention_share: bool = False


def _rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """x[rows] as a view when the rows are consecutive (no copy), else a gathered copy."""
    start = rows[0]
    if list(rows) == list(range(start, start + len(rows))):
        return x[start : start + len(rows)]
    return x[torch.as_tensor(rows, device=x.device)]


def _mask_rows(mask: torch.Tensor | None, rows: Sequence[int]) -> torch.Tensor | None:
    if mask is None:
        return None
    m = mask_4d(mask)
    return m if m.shape[0] == 1 else _rows(m, rows)


def shared_keys_mask(
    mask: torch.Tensor | None, groups: Sequence[SharedGroup], tokens: int, shift: float, dtype: torch.dtype
) -> torch.Tensor | None:
    """The additive mask over [own keys; reference keys] for every target row, or None.

    Without a mask from further out this is the `[1, 2N]` row `[0…0, δ…δ]` (None when
    δ = 0). A mask set further out (on the N own keys) is carried over to both key
    blocks: a target's own columns keep its own mask, the reference columns take
    the reference row's mask, plus δ.
    """
    if mask is None:
        if shift == 0:
            return None
        row = torch.zeros(1, 2 * tokens, dtype=dtype)
        row[:, tokens:] = shift
        return row
    targets = [t for g in groups for t in g.targets]
    references = [g.reference for g in groups for _ in g.targets]
    own = _mask_rows(mask, targets)
    ref = _mask_rows(mask, references)
    if own.shape[0] != ref.shape[0]:
        ref = ref.expand(own.shape[0], *ref.shape[1:])
    return torch.cat([own.to(dtype), ref.to(dtype) + shift], dim=-1)


#: Bytes the shared attention and the shared GroupNorm may allocate beyond what the
#: unpatched layer does: targets are processed in slices that fit. Their concatenated
#: [own; reference] keys and values cannot be avoided (the attention kernel takes keys
#: per row), but they need not exist for the whole batch at once.
SHARED_CHUNK_BYTES = 256 * 2**20


def shared_rows_per_chunk(tokens: int, channels: int, value_channels: int, itemsize: int,
                          budget: int = SHARED_CHUNK_BYTES) -> int:
    """How many target rows one slice of `shared_attention` holds within `budget` bytes.

    A target row needs its AdaIN'd queries (N·C), its 2N keys (2N·C) and 2N values
    (2N·Cv), plus its output (N·Cv); at least one row is always taken.
    """
    per_row = tokens * (3 * channels + 3 * value_channels) * itemsize
    return max(1, budget // max(per_row, 1))


def shared_attention_extra_bytes(rows: int, targets: int, tokens: int, channels: int, itemsize: int,
                                 options: StyleAlignedOptions, group_norm: bool,
                                 budget: int = SHARED_CHUNK_BYTES) -> int:
    """Peak bytes one shared layer of `rows` batch rows (`targets` of them sharing) holds beyond plain attention.

    The slices' concatenated keys and values (at most `budget`), the targets' outputs
    held beside the batch's, and with `group_norm` the GroupNorm slices (at most
    `budget`); `full_attention_share` instead gathers every row's q, k, v into one
    sequence (three copies of the layer's inputs, and the joint output).
    """
    layer = tokens * channels * itemsize
    if options.full_attention_share:
        return 4 * rows * layer
    slices = min(budget, targets * tokens * 6 * channels * itemsize) if targets else 0
    return slices + targets * layer + (budget if group_norm and targets else 0)


def shared_attention(q, k, v, groups: Sequence[SharedGroup], attend: Callable, options: StyleAlignedOptions,
                     mask: torch.Tensor | None = None, budget: int = SHARED_CHUNK_BYTES) -> torch.Tensor:
    """StyleAligned self-attention of a batch `[B, N, C]`; rows in no group's targets get plain attention.

    Targets are attended in slices of at most `shared_rows_per_chunk` rows, so the
    shared keys and values of a large batch never exist all at once.
    """
    if options.full_attention_share:
        return full_attention_share(q, k, v, groups, attend, mask)
    targets = [t for g in groups for t in g.targets]
    if not targets:
        return attend(q, k, v, mask)
    n = q.shape[1]
    rows = shared_rows_per_chunk(n, k.shape[-1], v.shape[-1], q.element_size(), budget)
    slices = [SharedGroup(g.reference, g.targets[i : i + rows]) for g in groups for i in range(0, len(g.targets), rows)]
    shared_out = None
    start = 0
    for part in _batches(slices, rows):
        out = _shared_attention_slice(q, k, v, part, attend, options, mask)
        if shared_out is None:
            if len(part) == len(slices):
                shared_out = out
                break
            shared_out = out.new_empty(len(targets), *out.shape[1:])
        shared_out[start : start + out.shape[0]] = out
        start += out.shape[0]
    return _with_plain_rows(shared_out, targets, q, k, v, attend, mask)


def _batches(slices: Sequence[SharedGroup], rows: int):
    """Consecutive groups of slices holding at most `rows` targets together (a slice never exceeds it)."""
    part, count = [], 0
    for group in slices:
        if part and count + len(group.targets) > rows:
            yield part
            part, count = [], 0
        part.append(group)
        count += len(group.targets)
    if part:
        yield part


def _shared_attention_slice(q, k, v, groups: Sequence[SharedGroup], attend: Callable, options: StyleAlignedOptions,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """The shared attention output of the targets of `groups`, in their order."""
    targets = [t for g in groups for t in g.targets]
    n = q.shape[1]
    s = len(targets)
    q_shared = torch.empty_like(q[:s]) if options.adain_queries else _rows(q, targets)
    k_shared = q.new_empty(s, 2 * n, k.shape[-1])  # [K̂_i ; s·K_r]
    v_shared = q.new_empty(s, 2 * n, v.shape[-1])  # [V_i ; V_r]
    start = 0
    for group in groups:
        span = slice(start, start + len(group.targets))
        start = span.stop
        r = group.reference
        q_i, k_i, v_i = (_rows(x, group.targets) for x in (q, k, v))
        q_r, k_r, v_r = q[r : r + 1], k[r : r + 1], v[r : r + 1]
        if options.adain_queries:
            adain(q_i, q_r, out=q_shared[span])
        if options.adain_keys:
            adain(k_i, k_r, out=k_shared[span, :n])
        else:
            k_shared[span, :n] = k_i
        if options.adain_values:
            adain(v_i, v_r, out=v_shared[span, :n])
        else:
            v_shared[span, :n] = v_i
        # adain(K_r, K_r) is the identity: the reference's keys enter as they are.
        torch.mul(k_r.expand(len(group.targets), -1, -1), options.shared_score_scale, out=k_shared[span, n:])
        v_shared[span, n:] = v_r
    shared_mask = shared_keys_mask(mask, groups, n, options.shared_score_shift, q.dtype)
    return attend(q_shared, k_shared, v_shared, shared_mask)


def _with_plain_rows(rows_out, rows, q, k, v, attend, mask):
    """The batch output: `rows_out` at `rows`, plain attention on every other row."""
    batch = q.shape[0]
    if list(rows) == list(range(batch)):
        return rows_out
    out = rows_out.new_empty(batch, *rows_out.shape[1:])
    out[torch.as_tensor(rows, device=q.device)] = rows_out
    taken = set(rows)
    plain = [i for i in range(batch) if i not in taken]
    if plain:
        out[torch.as_tensor(plain, device=q.device)] = attend(
            _rows(q, plain), _rows(k, plain), _rows(v, plain), _mask_rows(mask, plain)
        )
    return out


def full_attention_share(q, k, v, groups: Sequence[SharedGroup], attend: Callable,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's ablation: each chunk's sharing images attend jointly to all their tokens, no AdaIN.

    The images of a group (reference and targets) become one sequence of |group|·N
    tokens; rows in no group get plain attention.
    """
    if mask is not None:
        raise ValueError(
            "SharedAttentionStyleAlign: full_attention_share cannot be combined with another node that masks "
            "self-attention; turn full_attention_share off or remove the masking node"
        )
    n = q.shape[1]
    rows, outputs = [], []
    for group in groups:
        if not group.targets:
            continue
        members = [group.reference, *group.targets]
        joint = [_rows(x, members).reshape(1, len(members) * n, x.shape[-1]) for x in (q, k, v)]
        outputs.append(attend(*joint).reshape(len(members), n, -1))
        rows += members
    if not rows:
        return attend(q, k, v)
    return _with_plain_rows(torch.cat(outputs), rows, q, k, v, attend, None)


def shared_group_norm(x: torch.Tensor, groups: Sequence[SharedGroup], norm: Callable,
                      budget: int = SHARED_CHUNK_BYTES) -> torch.Tensor:
    """`share_group_norm`: a target's GroupNorm statistics come from concat(x_i, x_r) along H.

    `norm` is the layer's own GroupNorm forward; x is `[B, C, H, ...]`. The joint map
    is normalised and x_i's half kept, as the paper's code does; the reference
    (concatenated with itself the statistics would not change) and rows in no group
    are normalised alone. Targets go in slices whose joint maps (input and output)
    fit in `budget` bytes.
    """
    targets = [t for g in groups for t in g.targets]
    if not targets:
        return norm(x)
    references = [g.reference for g in groups for _ in g.targets]
    h = x.shape[2]
    rows = max(1, budget // max(4 * x[0].numel() * x.element_size(), 1))  # joint in and out: 2 × 2 maps a row
    out = norm(x)
    for start in range(0, len(targets), rows):
        part = targets[start : start + rows]
        joint = torch.cat([_rows(x, part), _rows(x, references[start : start + rows])], dim=2)
        out[torch.as_tensor(part, device=x.device)] = norm(joint)[:, :, :h]
    return out
