"""StyleAligned on a DiT's joint token layout against the equations written out in float64 (no host)."""

import math

import pytest
import torch

from attention_lab.attention_patches import sdpa_attention
from attention_lab.attention_patches.call import AttentionCall, ChunkLayout
from attention_lab.attention_patches.dit import dit_layers
from attention_lab.attention_patches.dit_style_aligned import DitStyleAligned, dit_sharing_layers
from attention_lab.attention_patches.shared_attention import StyleAlignedOptions
from attention_lab.attention_patches.style_aligned import StyleAlignedSettings

HEADS, DIM = 2, 8
TEXT, H, W, EXTRA = 5, 3, 4, 2  # [text | 3×4 image grid | 2 further tokens]
N = TEXT + H * W + EXTRA


def attend(q, k, v, mask=None):
    return sdpa_attention(q, k, v, HEADS, mask=mask)


def heads_of(x, heads=HEADS):  # [N, H*d] -> [H, N, d]
    return x.reshape(x.shape[0], heads, -1).transpose(0, 1)


def merge(x):  # [H, N, d] -> [N, H*d]
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def stats(x):  # [H, N, d] over tokens: unbiased variance + 1e-5
    return x.mean(dim=1, keepdim=True), (x.var(dim=1, keepdim=True, unbiased=True) + 1e-5).sqrt()


def adain_image(x, r, img):
    """x, r [H, N, d]: x with its image tokens AdaIN'd to r's image tokens, text and further tokens untouched."""
    mx, sx = stats(x[:, img])
    mr, sr = stats(r[:, img])
    out = x.clone()
    out[:, img] = sr * (x[:, img] - mx) / sx + mr
    return out


def joint_equation(q, k, v, target, reference, options, text=TEXT, image=H * W, heads=HEADS):
    """The module doc's equations for one target row `[N, heads·d]` of q/k/v, literally, in float64."""
    q_i, k_i, v_i = (heads_of(x[target].double(), heads) for x in (q, k, v))
    q_r, k_r, v_r = (heads_of(x[reference].double(), heads) for x in (q, k, v))
    img = slice(text, text + image)
    if options.adain_queries:
        q_i = adain_image(q_i, q_r, img)
    if options.adain_keys:
        k_i = adain_image(k_i, k_r, img)
    if options.adain_values:
        v_i = adain_image(v_i, v_r, img)
    keys = torch.cat([k_i, options.shared_score_scale * k_r[:, img]], dim=1)
    values = torch.cat([v_i, v_r[:, img]], dim=1)
    logits = q_i @ keys.transpose(-1, -2) / math.sqrt(q_i.shape[-1])
    logits[..., q_i.shape[1]:] += options.shared_score_shift
    return merge(logits.softmax(-1) @ values)


def plain(q, k, v, row):
    qi, ki, vi = (heads_of(x[row].double()) for x in (q, k, v))
    return merge((qi @ ki.transpose(-1, -2) / math.sqrt(DIM)).softmax(-1) @ vi)


def call_for(layout, layer=("single_block", 0, 0)):
    return AttentionCall(layer=layer, ordinal=0, num_layers=1, is_self=True, height=H, width=W, heads=HEADS,
                         dim_head=DIM, step=None, total_steps=None, sigma=None, layout=layout, options={},
                         family="flux", text_tokens=TEXT, joint=True)


@pytest.mark.parametrize("options", [
    StyleAlignedOptions(),
    StyleAlignedOptions(shared_score_scale=0.5, shared_score_shift=math.log(2)),
    StyleAlignedOptions(adain_queries=False, adain_keys=False, adain_values=True, shared_score_shift=-0.3),
], ids=["paper", "scale_shift", "values_only"])
@pytest.mark.parametrize("cond_or_uncond,reference,share_with", [
    ((0,), 0, None), ((1, 0), 1, None), ((1, 0), 0, (2,)),
], ids=["cfg1", "cfg", "cfg_subset"])
def test_joint_layout_equals_the_equations(options, cond_or_uncond, reference, share_with):
    images = 3
    layout = ChunkLayout(cond_or_uncond, images)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(cond_or_uncond) * images, N, HEADS * DIM, generator=g) for _ in range(3))
    settings = StyleAlignedSettings(reference_index=reference, share_with=share_with, attention=options)
    technique = DitStyleAligned(settings, frozenset({("single_block", 0, 0)}))
    out = technique(q, k, v, call_for(layout), attend)
    for chunk in range(len(cond_or_uncond)):
        r = layout.row(chunk, reference)
        for image in range(images):
            row = layout.row(chunk, image)
            shares = image != reference and (share_with is None or image in share_with)
            expected = joint_equation(q, k, v, row, r, options) if shares else plain(q, k, v, row)
            assert torch.allclose(out[row].double(), expected, atol=1e-5), (chunk, image)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs(dtype):
    layout = ChunkLayout((1, 0), 3)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(6, N, HEADS * DIM, generator=g).to(dtype) for _ in range(3))
    options = StyleAlignedOptions(shared_score_shift=math.log(2))
    technique = DitStyleAligned(StyleAlignedSettings(attention=options), frozenset({("single_block", 0, 0)}))
    out = technique(q, k, v, call_for(layout), attend)
    assert out.dtype == dtype
    for row in (1, 2, 4, 5):
        reference = 0 if row < 3 else 3
        expected = joint_equation(q.double(), k.double(), v.double(), row, reference, options)
        assert torch.allclose(out[row].double(), expected, atol=3e-2), (row, (out[row].double() - expected).abs().max())


def test_the_reference_text_is_not_shared():
    """A target sees the reference's image tokens only: the reference's text and further tokens do not reach it."""
    layout = ChunkLayout((0,), 2)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, N, HEADS * DIM, generator=g) for _ in range(3))
    technique = DitStyleAligned(StyleAlignedSettings(attention=StyleAlignedOptions(adain_queries=False,
                                                                                   adain_keys=False)),
                                frozenset({("single_block", 0, 0)}))
    out = technique(q, k, v, call_for(layout), attend)
    k2, v2 = k.clone(), v.clone()
    own = [i for i in range(N) if not TEXT <= i < TEXT + H * W]
    k2[0, own] = torch.randn(len(own), HEADS * DIM, generator=g)
    v2[0, own] = torch.randn(len(own), HEADS * DIM, generator=g)
    changed = technique(q, k2, v2, call_for(layout), attend)
    assert torch.allclose(changed[1], out[1], atol=1e-6)  # the target sees only the reference's image tokens
    assert not torch.allclose(changed[0], out[0], atol=1e-3)  # the reference itself does see them


def test_block_choices():
    flux = dit_layers(2, 4)
    sd3 = dit_layers(3, 0, [0, 1])
    assert dit_sharing_layers(flux, "flux", "auto") == frozenset(l for l in flux if l[0] == "single_block")
    assert dit_sharing_layers(flux, "flux", "double") == frozenset(l for l in flux if l[0] == "double_block")
    assert dit_sharing_layers(flux, "flux", "all") == frozenset(flux)
    assert dit_sharing_layers(sd3, "sd3", "auto") == frozenset(sd3)
    with pytest.raises(ValueError, match="dit_blocks: 'single' selects no block of this sd3 model"):
        dit_sharing_layers(sd3, "sd3", "single")
    with pytest.raises(ValueError, match="dit_blocks: expected one of"):
        dit_sharing_layers(flux, "flux", "input")
    # only_self_level: the paper's switch vector over the chosen blocks (every 2nd of 4 single blocks plain at 0.5)
    half = dit_sharing_layers(flux, "flux", "auto", only_self_level=0.5)
    assert half == {("single_block", 1, 0), ("single_block", 3, 0)}
    assert dit_sharing_layers(flux, "flux", "auto", only_self_level=1.0) == frozenset()
