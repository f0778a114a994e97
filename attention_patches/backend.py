"""Attention kernels in ComfyUI's calling convention, and the head layout helpers.

The router computes attention through a backend with ComfyUI's signature
`f(q, k, v, heads, mask=None, attn_precision=None, transformer_options=None)`,
q/k/v `[B, N, heads*dim_head]`. Inside ComfyUI the adapter hands the router
ComfyUI's own `optimized_attention` (SDPA on CUDA, sage/xformers/flash when the
user chose them); `sdpa_attention` below is the portable default that keeps this
package usable and testable without the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, N, H*d]` -> `[B, H, N, d]`."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, N, d]` -> `[B, N, H*d]`."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa_attention(q, k, v, heads, mask=None, attn_precision=None, transformer_options=None, **kwargs):
    """softmax(QKᵀ/√d + mask)·V with torch's fused kernel.

    `attn_precision=torch.float32` upcasts q/k/v (SD2 needs fp32 attention in fp16);
    `mask` is additive, broadcastable to `[B, H, Nq, Nk]`.
    """
    dtype = q.dtype
    if attn_precision == torch.float32 and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    if mask is not None:
        mask = mask_4d(mask).to(q.dtype)
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), attn_mask=mask)
    return merge_heads(out).to(dtype)


def attention_probabilities(q, k, heads: int, mask=None) -> torch.Tensor:
    """`softmax(Q_h K_hᵀ/√d + mask)` per head: `[B, H, Nq, Nk]` in float32.

    q `[B, Nq, H*d]`, k `[B, Nk, H*d]`; `mask` additive, as `mask_4d` takes it.
    For the techniques that read the maps themselves (recorders, guidance losses);
    differentiable. (The scale is applied to Q, the small operand.)
    """
    q, k = split_heads(q.float(), heads), split_heads(k.float(), heads)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        logits += mask_4d(mask).float()
    return logits.softmax(-1)


def mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """An additive mask `[Nq,Nk]`, `[B|1,Nq,Nk]` or `[B|1,H|1,Nq,Nk]` as `[B|1,H|1,Nq,Nk]`."""
    if mask.ndim == 2:
        return mask[None, None]
    return mask.unsqueeze(1) if mask.ndim == 3 else mask


def mask_min(dtype: torch.dtype) -> float:
    """The most negative finite logit offset for `dtype`.

    Masks use `finfo.min` rather than -inf (as Bounded Attention's code does): a
    fully masked row then stays finite instead of turning the softmax into NaN.
    """
    return torch.finfo(dtype).min
