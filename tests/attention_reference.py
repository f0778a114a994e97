"""The attention equation written out in float64, for tests to compare against."""

from attention_lab.attention_patches import split_heads


def softmax_attention(q, k, v, heads, mask=None):
    """softmax(QKᵀ/√d + mask)·V on `[B, N, heads*d]` tensors, in float64, heads merged back."""
    q, k, v = (split_heads(t, heads).double() for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits + mask.double()
    out = logits.softmax(-1) @ v
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)
