"""StyleAligned math against a direct float64 implementation of docs/methods.md §1 (no host)."""

import itertools
import math

import pytest
import torch

from attention_lab.attention_patches import sdpa_attention
from attention_lab.attention_patches.call import AttentionCall, ChunkLayout
from attention_lab.attention_patches.shared_attention import (
    SharedGroup,
    StyleAlignedOptions,
    adain,
    shared_attention,
    shared_group_norm,
)
from attention_lab.attention_patches.style_aligned import (
    SharedGroupNormForward,
    SharedNormState,
    StyleAligned,
    StyleAlignedSettings,
    paper_layer_order,
    parse_blocks,
    parse_image_list,
    plain_layers,
    sharing_groups,
    zero_reference_control,
)
from attention_lab.attention_patches.style_reference import ReferenceTrajectory, trajectory_step

HEADS, DIM, TOKENS = 2, 8, 12


def attend_with(heads):
    def attend(q, k, v, mask=None):
        return sdpa_attention(q, k, v, heads, mask=mask)

    return attend


# -- the paper's equations, written out literally in float64 ---------------------


def paper_stats(x):  # x [H, N, d]: per head and channel, over tokens, unbiased + 1e-5
    return x.mean(dim=1, keepdim=True), (x.var(dim=1, keepdim=True, unbiased=True) + 1e-5).sqrt()


def paper_adain(x, r):
    mx, sx = paper_stats(x)
    mr, sr = paper_stats(r)
    return sr * (x - mx) / sx + mr


def heads_of(x):  # [N, H*d] -> [H, N, d]
    return x.reshape(x.shape[0], HEADS, -1).transpose(0, 1)


def merge(x):  # [H, N, d] -> [N, H*d]
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def softmax_attention(q, k, v, bias=None):  # materialised, [H, N, d] / [H, M, d]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


def direct_style_aligned(q, k, v, layout, reference, share_with, o: StyleAlignedOptions):
    """Every row as the paper's SharedAttentionProcessor computes it (reference row included)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    n = q.shape[1]
    for chunk in range(len(layout.cond_or_uncond)):
        r = layout.row(chunk, reference)
        Qr, Kr, Vr = heads_of(q[r]), heads_of(k[r]), heads_of(v[r])
        sharing = [i for i in range(layout.images) if i != reference and (share_with is None or i in share_with)]
        for image in range(layout.images):
            i = layout.row(chunk, image)
            Qi, Ki, Vi = heads_of(q[i]), heads_of(k[i]), heads_of(v[i])
            if image not in sharing and image != reference:
                out[i] = merge(softmax_attention(Qi, Ki, Vi))
                continue
            Qh = paper_adain(Qi, Qr) if o.adain_queries else Qi
            Kh = paper_adain(Ki, Kr) if o.adain_keys else Ki
            Vh = paper_adain(Vi, Vr) if o.adain_values else Vi
            Krh = paper_adain(Kr, Kr) if o.adain_keys else Kr
            Vrh = paper_adain(Vr, Vr) if o.adain_values else Vr
            scale = 1.0 if image == reference else o.shared_score_scale  # not on the reference's own row
            keys = torch.cat([Kh, scale * Krh], dim=1)
            values = torch.cat([Vh, Vrh], dim=1)
            bias = torch.zeros(2 * n, dtype=torch.float64)
            bias[n:] = o.shared_score_shift
            out[i] = merge(softmax_attention(Qh, keys, values, bias))
    return out


def direct_full_share(q, k, v, layout, reference, share_with):
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for chunk in range(len(layout.cond_or_uncond)):
        members = [i for i in range(layout.images) if i == reference or share_with is None or i in share_with]
        rows = [layout.row(chunk, i) for i in members]
        joint = [heads_of(x[rows].reshape(-1, x.shape[-1])) for x in (q, k, v)]
        shared = merge(softmax_attention(*joint)).reshape(len(rows), -1, q.shape[-1])
        for j, row in enumerate(rows):
            out[row] = shared[j]
        for image in set(range(layout.images)) - set(members):
            i = layout.row(chunk, image)
            out[i] = merge(softmax_attention(heads_of(q[i]), heads_of(k[i]), heads_of(v[i])))
    return out


def random_qkv(batch, dtype, seed=0, tokens=TOKENS):
    g = torch.Generator().manual_seed(seed)
    # distinct per-image statistics, so AdaIN has something to do
    scale = 0.5 + torch.rand(batch, 1, HEADS * DIM, generator=g) * 2
    shift = torch.randn(batch, 1, HEADS * DIM, generator=g)
    return [(torch.randn(batch, tokens, HEADS * DIM, generator=g) * scale + shift).to(dtype) for _ in range(3)]


OPTION_GRID = [
    StyleAlignedOptions(),  # the paper's defaults
    StyleAlignedOptions(shared_score_shift=math.log(2)),  # transfer notebook
    StyleAlignedOptions(shared_score_scale=0.5),  # "very famous images"
    StyleAlignedOptions(shared_score_scale=1.7, shared_score_shift=-0.8, adain_values=True),
    StyleAlignedOptions(adain_queries=False, adain_keys=False),  # ablation without AdaIN
    StyleAlignedOptions(adain_queries=True, adain_keys=False, shared_score_shift=0.3),
]
LAYOUTS = [
    (ChunkLayout((1, 0), 4), 0, None),  # CFG [uncond×4, cond×4]
    (ChunkLayout((0,), 3), 0, None),  # cfg == 1
    (ChunkLayout((0, 1), 4), 2, None),  # reordered chunks, reference not first
    (ChunkLayout((1, 0, 0), 3), 1, (0,)),  # three chunks, only image 0 shares
    (ChunkLayout((1, 0), 5), 0, (1, 3)),  # 2 and 4 do not share
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: f"{o}"[20:80])
@pytest.mark.parametrize("layout,reference,share_with", LAYOUTS, ids=["cfg", "cfg1", "ref2", "3chunks", "subset"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 4e-3)], ids=["fp32", "fp16"])
def test_attention_matches_the_equations(options, layout, reference, share_with, dtype, tol):
    batch = len(layout.cond_or_uncond) * layout.images
    q, k, v = random_qkv(batch, dtype, seed=batch + reference)
    groups = sharing_groups(layout, reference, share_with)
    out = shared_attention(q, k, v, groups, attend_with(HEADS), options)
    expected = direct_style_aligned(q, k, v, layout, reference, share_with, options)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.double() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), err
    # the patch does change the sharing images (a test of the test)
    plain = direct_style_aligned(q, k, v, layout, reference, (), options)
    targets = [t for g in groups for t in g.targets]
    assert (expected[targets] - plain[targets]).abs().max() > 50 * tol


@pytest.mark.parametrize("layout,reference,share_with", LAYOUTS, ids=["cfg", "cfg1", "ref2", "3chunks", "subset"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 4e-3)], ids=["fp32", "fp16"])
def test_full_attention_share_matches_the_equations(layout, reference, share_with, dtype, tol):
    batch = len(layout.cond_or_uncond) * layout.images
    q, k, v = random_qkv(batch, dtype, seed=7)
    groups = sharing_groups(layout, reference, share_with)
    out = shared_attention(q, k, v, groups, attend_with(HEADS), StyleAlignedOptions(full_attention_share=True))
    expected = direct_full_share(q, k, v, layout, reference, share_with)
    assert (out.double() - expected).abs().max() <= tol * expected.abs().max()


def test_reference_row_is_plain_attention_whatever_the_shift():
    layout = ChunkLayout((1, 0), 3)
    q, k, v = random_qkv(6, torch.float32, seed=3)
    options = StyleAlignedOptions(shared_score_shift=2.0, shared_score_scale=0.3)
    out = shared_attention(q, k, v, sharing_groups(layout, 0, None), attend_with(HEADS), options)
    for r in (0, 3):
        plain = sdpa_attention(q[r : r + 1], k[r : r + 1], v[r : r + 1], HEADS)
        assert torch.equal(out[r : r + 1], plain)  # computed as plain attention, bit for bit
    # and the paper's literal formula for that row agrees
    expected = direct_style_aligned(q, k, v, layout, 0, None, options)
    assert (out[[0, 3]].double() - expected[[0, 3]]).abs().max() < 2e-5


class Spy:
    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, mask=None):
        self.calls.append((tuple(q.shape), tuple(k.shape), None if mask is None else tuple(mask.shape)))
        return sdpa_attention(q, k, v, HEADS, mask=mask)


def test_shift_is_a_key_row_not_a_matrix():
    layout = ChunkLayout((1, 0), 4)
    q, k, v = random_qkv(8, torch.float32)
    groups = sharing_groups(layout, 0, None)
    spy = Spy()
    shared_attention(q, k, v, groups, spy, StyleAlignedOptions())
    # one call for the 6 targets over 2N keys (no mask at δ = 0), one plain call for the 2 references
    assert spy.calls == [((6, TOKENS, 16), (6, 2 * TOKENS, 16), None), ((2, TOKENS, 16), (2, TOKENS, 16), None)]
    spy = Spy()
    shared_attention(q, k, v, groups, spy, StyleAlignedOptions(shared_score_shift=0.5))
    assert spy.calls[0][2] == (1, 2 * TOKENS)


def test_mask_from_further_out_covers_both_key_blocks():
    layout = ChunkLayout((1, 0), 3)
    q, k, v = random_qkv(6, torch.float64, seed=5)
    g = torch.Generator().manual_seed(1)
    outer = torch.where(torch.rand(6, TOKENS, TOKENS, generator=g) < 0.3, -1e4, 0.0).double()
    groups = sharing_groups(layout, 0, None)
    options = StyleAlignedOptions(shared_score_shift=0.7)
    out = shared_attention(q, k, v, groups, attend_with(HEADS), options, mask=outer)
    for group in groups:
        r = group.reference
        for i in group.targets:
            Qh, Kh = paper_adain(heads_of(q[i]), heads_of(q[r])), paper_adain(heads_of(k[i]), heads_of(k[r]))
            keys = torch.cat([Kh, heads_of(k[r])], dim=1)
            values = torch.cat([heads_of(v[i]), heads_of(v[r])], dim=1)
            bias = torch.cat([outer[i], outer[r] + 0.7], dim=-1)
            assert torch.allclose(out[i], merge(softmax_attention(Qh, keys, values, bias)), atol=1e-10)
        plain = merge(softmax_attention(heads_of(q[r]), heads_of(k[r]), heads_of(v[r]), outer[r]))
        assert torch.allclose(out[r], plain, atol=1e-10)


def test_adain_is_per_channel_over_tokens_with_unbiased_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 50, 4, generator=g) * 3 + 1
    r = torch.randn(1, 50, 4, generator=g) * 0.5 - 2
    out = adain(x, r)
    assert torch.allclose(out.mean(1), r.mean(1).expand(2, -1), atol=1e-5)
    # std matches up to the 1e-5 in both variances
    expected_std = ((r.var(1, unbiased=True) + 1e-5) / (x.var(1, unbiased=True) + 1e-5)).sqrt() * x.std(1)
    assert torch.allclose(out.std(1), expected_std, atol=1e-5)
    assert torch.allclose(adain(r, r), r, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_shared_group_norm_is_statistics_over_concat(dtype, tol):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 8, 5, 7, generator=g) * torch.linspace(0.5, 3, 6).view(6, 1, 1, 1)).to(dtype)
    weight, bias = torch.rand(8, generator=g).to(dtype), torch.randn(8, generator=g).to(dtype)
    norm = lambda t: torch.nn.functional.group_norm(t, 4, weight, bias, 1e-5)  # noqa: E731
    groups = sharing_groups(ChunkLayout((1, 0), 3), 0, (1,))  # image 2 does not share
    out = shared_group_norm(x, groups, norm)
    xd, wd, bd = x.double(), weight.double(), bias.double()
    for i, r in [(1, 0), (4, 3)]:
        joint = torch.nn.functional.group_norm(torch.cat([xd[i : i + 1], xd[r : r + 1]], dim=2), 4, wd, bd, 1e-5)
        assert (out[i].double() - joint[0, :, :5]).abs().max() <= tol * 10
    for i in (0, 2, 3, 5):
        alone = torch.nn.functional.group_norm(xd[i : i + 1], 4, wd, bd, 1e-5)[0]
        assert (out[i].double() - alone).abs().max() <= tol * 10
    assert (out[1].double() - torch.nn.functional.group_norm(xd[1:2], 4, wd, bd, 1e-5)[0]).abs().max() > 0.05


def test_group_norm_forward_shares_only_while_the_state_says_so():
    norm = torch.nn.GroupNorm(2, 4)
    state = SharedNormState()
    forward = SharedGroupNormForward(norm.forward, state)
    x = torch.randn(2, 4, 3, 3) * torch.tensor([1.0, 4.0]).view(2, 1, 1, 1)
    assert torch.equal(forward(x), norm(x))
    state.groups = [SharedGroup(0, (1,))]
    assert not torch.allclose(forward(x)[1], norm(x)[1])
    assert torch.equal(forward(x)[0], norm(x)[0])


def test_groups_per_chunk_never_b_over_2():
    assert sharing_groups(ChunkLayout((1, 0), 3), 0, None) == [SharedGroup(0, (1, 2)), SharedGroup(3, (4, 5))]
    assert sharing_groups(ChunkLayout((0,), 3), 1, None) == [SharedGroup(1, (0, 2))]
    assert sharing_groups(ChunkLayout((1,), 4), 3, (0, 2, 3)) == [SharedGroup(3, (0, 2))]
    with pytest.raises(ValueError, match="reference_index is 3 but the batch has 2"):
        sharing_groups(ChunkLayout((0,), 2), 3, None)
    with pytest.raises(ValueError, match=r"share_with names image\(s\) \[5\]"):
        sharing_groups(ChunkLayout((0,), 2), 0, (1, 5))


def test_image_list_is_parsed_as_data():
    assert parse_image_list("") is None and parse_image_list(" all ") is None
    assert parse_image_list("1, 3") == (1, 3) and parse_image_list("[3, 1, 1]") == (1, 3)
    for bad in ("1; 2", "__import__('os')", "[-1]", "[1.5]", "{\"a\": 1}", "true"):
        with pytest.raises(ValueError, match="share_with"):
            parse_image_list(bad)


def test_blocks():
    assert parse_blocks("all") == {"input", "middle", "output"}
    assert parse_blocks("output, middle") == {"middle", "output"}
    with pytest.raises(ValueError, match="blocks"):
        parse_blocks("decoder")


SDXL_LAYERS = (
    [("input", b, i) for b, d in ((4, 2), (5, 2), (7, 10), (8, 10)) for i in range(d)]
    + [("middle", 0, i) for i in range(10)]
    + [("output", b, i) for b, d in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)) for i in range(d)]
)


def test_only_self_level_follows_the_papers_switch_vector():
    assert len(SDXL_LAYERS) == 70
    order = paper_layer_order(SDXL_LAYERS)
    assert order[:24] == SDXL_LAYERS[:24] and order[24:60] == SDXL_LAYERS[34:] and order[60:] == SDXL_LAYERS[24:34]
    assert plain_layers(SDXL_LAYERS, 0.0) == set() and plain_layers(SDXL_LAYERS, 1.0) == set(SDXL_LAYERS)
    # level 0.3: int(0.3·70) = 21 switch, every 70 // 21 = 3rd layer of the paper's order falls back
    assert plain_layers(SDXL_LAYERS, 0.3) == {order[i] for i in range(0, 70, 3)}
    # above 0.5 the complement: level 0.8 keeps every 70 // 14 = 5th layer shared
    assert plain_layers(SDXL_LAYERS, 0.8) == set(order) - {order[i] for i in range(0, 70, 5)}
    with pytest.raises(ValueError, match="only_self_level"):
        plain_layers(SDXL_LAYERS, 1.5)


def make_call(layer, layout, step, total=10, is_self=True, options=None):
    sigmas = torch.linspace(10, 0, total + 1)
    return AttentionCall(layer=layer, ordinal=0, num_layers=70, is_self=is_self, height=4, width=3, heads=HEADS,
                         dim_head=DIM, step=step, total_steps=total, sigma=float(sigmas[step]), layout=layout,
                         options=options or {})


def test_technique_selects_layers_steps_and_batches():
    settings = StyleAlignedSettings(blocks=parse_blocks("output"), only_self_level=0.3, start_percent=0.2,
                                    end_percent=0.6)
    technique = StyleAligned(settings, SDXL_LAYERS)
    two = ChunkLayout((1, 0), 2)
    output_layers = [l for l in paper_layer_order(SDXL_LAYERS) if l[0] == "output"]
    shared = [l for l in output_layers if technique.wants(make_call(l, two, 3))]
    assert 0 < len(shared) < len(output_layers)  # every 3rd falls back
    layer = shared[0]
    assert [s for s in range(10) if technique.wants(make_call(layer, two, s))] == [2, 3, 4, 5]
    assert not technique.wants(make_call(layer, two, 3, is_self=False))  # cross-attention untouched
    assert not technique.wants(make_call(layer, ChunkLayout((1, 0), 1), 3))  # batch of one: nothing to share
    assert not technique.wants(make_call(SDXL_LAYERS[0], two, 3))  # input block not selected
    full = StyleAligned(StyleAlignedSettings(), SDXL_LAYERS)
    assert all(full.wants(make_call(l, two, s)) for l in SDXL_LAYERS for s in range(10))


def test_settings_are_validated():
    with pytest.raises(ValueError, match="start_percent/end_percent"):
        StyleAlignedSettings(start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="reference_index"):
        StyleAlignedSettings(reference_index=-1)


def test_reference_control_is_zeroed_per_chunk():
    groups = sharing_groups(ChunkLayout((1, 0), 3), 1, None)
    residual = torch.ones(6, 2, 4, 4)
    shared_one = torch.ones(1, 2, 2, 2)
    control = {"input": [residual, None], "middle": [residual], "output": [shared_one, torch.ones(5, 1, 1, 1)]}
    out = zero_reference_control(control, groups, 6)
    rows = out["input"][0].flatten(1).amax(1)
    assert rows.tolist() == [1, 0, 1, 1, 0, 1]
    assert out["input"][1] is None and torch.equal(residual, torch.ones(6, 2, 4, 4))  # inputs untouched
    assert out["output"][0].shape[0] == 6 and out["output"][0][[1, 4]].abs().max() == 0
    assert out["output"][1].shape[0] == 5  # not addressable by row: unchanged
    assert zero_reference_control(control, sharing_groups(ChunkLayout((1, 0), 1), 0, None), 2) is control


@pytest.mark.parametrize("images", [1, 2, 3])
def test_every_option_combination_runs_finite_in_half(images):
    layout = ChunkLayout((1, 0), images)
    q, k, v = random_qkv(2 * images, torch.float16, seed=images)
    for aq, ak, av, full in itertools.product([False, True], repeat=4):
        options = StyleAlignedOptions(aq, ak, av, 0.8, 0.4, full)
        out = shared_attention(q, k, v, sharing_groups(layout, 0, None), attend_with(HEADS), options)
        assert out.shape == q.shape and torch.isfinite(out).all()


def test_photo_reference_steps_follow_the_transfer_notebook():
    # first step zts[offset]; after step i the notebook writes zts[max(offset + 1, i + 1)]
    assert [trajectory_step(i, 5) for i in range(10)] == [5, 6, 6, 6, 6, 6, 6, 7, 8, 9]
    assert [trajectory_step(i, 0) for i in range(4)] == [0, 1, 2, 3]
    sigmas = torch.tensor([14.6, 6.0, 2.0, 0.5, 0.0])  # sampling order
    latents = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 4, 2, 2)
    trajectory = ReferenceTrajectory(latents, sigmas, offset=1)
    assert [trajectory.latent_at(s)[0, 0, 0, 0].item() for s in (14.6, 6.01, 2.0, 0.5)] == [1, 2, 2, 3]
    assert trajectory.latent_at(14.6).shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match="offset: expected 0..3"):
        ReferenceTrajectory(latents, sigmas, offset=4)


def test_tiles_folded_into_the_batch_are_refused():
    """HyperTile (a stock node) reshapes attention rows to (image, tile): images cannot be addressed."""
    technique = StyleAligned(StyleAlignedSettings(), SDXL_LAYERS)
    q, k, v = random_qkv(8, torch.float32)  # 2 latents x 4 tiles
    call = make_call(SDXL_LAYERS[0], ChunkLayout((0,), 8), 0, options={"original_shape": [2, 4, 8, 6]})
    with pytest.raises(ValueError, match="HyperTile"):
        technique(q, k, v, call, attend_with(HEADS))
    whole = make_call(SDXL_LAYERS[0], ChunkLayout((0,), 8), 0, options={"original_shape": [8, 4, 8, 6]})
    assert technique(q, k, v, whole, attend_with(HEADS)).shape == q.shape


@pytest.mark.parametrize("shift", [0.0, math.log(2)])
def test_a_large_batch_is_attended_in_slices_within_the_budget(shift):
    """The shared keys and values exist for a budget's worth of targets at a time, never for the whole batch."""
    layout = ChunkLayout((1, 0), 9)
    q, k, v = random_qkv(18, torch.float32, seed=4)
    groups = sharing_groups(layout, 2, None)
    options = StyleAlignedOptions(shared_score_shift=shift)
    rows_seen = []

    def recording(q_, k_, v_, mask=None):
        rows_seen.append((q_.shape[0], k_.shape[1]))
        return attend_with(HEADS)(q_, k_, v_, mask)

    per_row = TOKENS * 6 * HEADS * DIM * 4  # queries, 2N keys, 2N values and the output of one fp32 row
    out = shared_attention(q, k, v, groups, recording, options, budget=5 * per_row)
    assert max(rows for rows, keys in rows_seen if keys == 2 * TOKENS) == 5  # 16 targets: 5, 5, 5, 1
    assert sum(rows for rows, keys in rows_seen if keys == 2 * TOKENS) == 16
    expected = direct_style_aligned(q, k, v, layout, 2, None, options)
    assert (out.double() - expected).abs().max() <= 2e-5 * expected.abs().max()


def test_shared_group_norm_of_a_large_batch_goes_in_slices():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 8, 5, 7, generator=g) * torch.linspace(0.5, 3, 10).view(10, 1, 1, 1)
    seen = []

    def norm(t):
        seen.append(t.shape[0])
        return torch.nn.functional.group_norm(t, 4)

    groups = sharing_groups(ChunkLayout((1, 0), 5), 0, None)
    whole = shared_group_norm(x, groups, norm)
    seen.clear()
    sliced = shared_group_norm(x, groups, norm, budget=3 * 4 * x[0].numel() * 4)
    assert seen == [10, 3, 3, 2]  # the batch alone, then the 8 targets' joint maps 3 at a time
    assert torch.allclose(sliced, whole, atol=1e-6)
