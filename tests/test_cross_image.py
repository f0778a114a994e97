"""Cross-Image Attention math against direct float64 implementations of docs/methods.md §2 (no host)."""

import math

import numpy as np
import pytest
import torch

from attention_lab.attention_patches import sdpa_attention
from attention_lab.attention_patches.call import AttentionCall, ChunkLayout
from attention_lab.attention_patches.cross_image import (
    APPEARANCE,
    OUTPUT,
    PASS_KEY,
    SOURCE,
    STRUCTURE,
    CrossImageAttention,
    CrossImagePass,
    CrossImageSchedule,
    adain,
    contrast,
    contrasted_attention,
    masked_adain,
    label_clusters,
    object_mask,
    swap_guidance_scales,
    swap_guided,
)
from attention_reference import softmax_attention

HEADS, DIM = 2, 8
LAYER = ("output", 9, 0)


def attend(q, k, v, mask=None):
    return sdpa_attention(q, k, v, HEADS, mask=mask)


def paper_contrasted(q, k, v, gamma):
    """The authors' code: softmax, then per head (A − row mean)·γ + row mean, clip to [0, 1], @ V."""
    b, n, _ = q.shape
    qh, kh, vh = (t.double().reshape(t.shape[0], t.shape[1], HEADS, DIM).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(qh @ kh.transpose(-1, -2) / DIM**0.5, dim=-1)
    out = torch.empty(b, HEADS, n, DIM, dtype=torch.float64)
    for i in range(b):
        for h in range(HEADS):
            # the authors write `a.mean(dim=-1)` without keepdim, which broadcasts right only for square
            # maps; every row mean is 1/N either way
            m = a[i, h].mean(dim=-1, keepdim=True)
            out[i, h] = torch.clip((a[i, h] - m) * gamma + m, 0.0, 1.0) @ vh[i, h]
    return out.transpose(1, 2).reshape(b, n, HEADS * DIM)


def test_contrast_is_the_authors_operation():
    a = torch.rand(3, 5, 7).softmax(-1)
    out = contrast(a, 1.67)
    expected = ((a - 1 / 7) * 1.67 + 1 / 7).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-7)
    assert torch.equal(contrast(a, 1.0), a)
    # not renormalised, and the smallest weights are cut to zero
    strong = contrast(torch.tensor([[0.7, 0.2, 0.05, 0.05]]), 3.0)
    assert strong[0, 2] == 0 and strong.sum() != 1


@pytest.mark.parametrize("gamma", [1.0, 1.67, 4.0])
def test_contrasted_attention_matches_the_authors_code(gamma):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, HEADS * DIM, generator=g) * 2 for n in (16, 16, 16))
    expected = paper_contrasted(q, k, v, gamma)
    assert torch.allclose(contrasted_attention(q, k, v, HEADS, gamma).double(), expected, atol=1e-5)
    # the query blocks (bounded memory) do not change the result
    assert torch.allclose(contrasted_attention(q, k, v, HEADS, gamma, chunk_elements=40).double(), expected, atol=1e-5)


def test_swap_guidance_schedule_is_the_authors_linspace():
    scales = swap_guidance_scales(3.5, 68)
    assert len(scales) == 68 and scales[0] == 3.5 and abs(scales[-1] - 1.75) < 1e-12
    assert abs(scales[10] - (3.5 - 1.75 * 10 / 67)) < 1e-12
    assert swap_guidance_scales(1.5, 3)[-1] == 1.0  # never below 1
    a, b = torch.randn(4), torch.randn(4)
    assert torch.allclose(swap_guided(a, b, 2.0), a + 2.0 * (b - a))


def paper_mean_std(feat, mask=None):  # the authors' calc_mean_std on [C, H, W]
    c = feat.shape[0]
    flat = feat.reshape(c, -1) if mask is None else feat.reshape(c, -1)[:, mask.reshape(-1) == 1]
    return flat.mean(1).view(c, 1, 1), (flat.var(1) + 1e-5).sqrt().view(c, 1, 1)


def test_adain_and_masked_adain_match_the_equations():
    g = torch.Generator().manual_seed(1)
    content = torch.randn(4, 8, 8, generator=g, dtype=torch.float64) * 2 + 1
    style = torch.randn(4, 6, 10, generator=g, dtype=torch.float64) * 0.5 - 3  # another size: statistics only
    cm, cs = paper_mean_std(content)
    sm, ss = paper_mean_std(style)
    assert torch.allclose(adain(content, style), (content - cm) / cs * ss + sm)

    content_mask = torch.zeros(8, 8, dtype=torch.float64)
    content_mask[2:6, 1:5] = 1
    style_mask = torch.zeros(6, 10, dtype=torch.float64)
    style_mask[:3, 4:] = 1
    cm, cs = paper_mean_std(content, content_mask)
    sm, ss = paper_mean_std(style, style_mask)
    moved = (content - cm) / cs * ss + sm
    expected = content * (1 - content_mask) + moved * content_mask
    out = masked_adain(content, style, content_mask, style_mask)
    assert torch.allclose(out, expected)
    assert torch.equal(out[:, content_mask == 0], content[:, content_mask == 0])  # outside the mask: untouched
    # inside, the output's statistics are the style's
    om, os_ = paper_mean_std(out, content_mask)
    assert torch.allclose(om, sm) and torch.allclose(os_, ss, atol=1e-4)
    # identity when content and style are the same latent and mask
    assert torch.allclose(masked_adain(content, content, content_mask, content_mask), content)


def object_clusters(scores):
    """The authors' rule with one noun scored: which clusters are the object."""
    return [label is not None for label in label_clusters([[score] for score in scores])]


def test_object_clusters_rule():
    # one clear object cluster: 0.9 > 1.4 * mean(0.1, 0.12, 0.11, 0.05) = 0.133 > every other score
    assert object_clusters([0.1, 0.9, 0.12, 0.11, 0.05]) == [False, True, False, False, False]
    # the bar is relative: 0.2 beats 1.4 * mean(0.1, 0.2, 0.15, 0.05) = 0.175
    assert object_clusters([0.1, 0.9, 0.2, 0.15, 0.05]) == [False, True, True, False, False]
    # two object clusters: the max is left out of the mean, the second still beats 1.4x it
    assert object_clusters([0.8, 0.9, 0.1, 0.1, 0.1]) == [True, True, False, False, False]
    # flat scores: nothing is the object
    assert not any(object_clusters([0.5, 0.5, 0.5, 0.5]))


def authors_cluster2noun(clusters, nouns_maps, num_segments):
    """`Segmentor.cluster2noun` of garibida/cross-image-attention, transcribed (numpy), minus the nltk
    tagging: `nouns_maps` `[h, w, nouns]` already at the cluster grid; returns cluster -> noun index or "BG"."""
    normalized = np.zeros_like(nouns_maps)
    for i in range(nouns_maps.shape[-1]):
        curr = nouns_maps[:, :, i]
        normalized[:, :, i] = (curr - np.abs(curr.min())) / curr.max()
    max_score, all_scores = 0, []
    for c in range(num_segments):
        cluster_mask = np.zeros_like(clusters)
        cluster_mask[clusters == c] = 1
        scores = [(cluster_mask * normalized[:, :, i]).sum() / cluster_mask.sum() for i in range(nouns_maps.shape[-1])]
        all_scores.append(max(scores))
        max_score = max(max(scores), max_score)
    all_scores.remove(max_score)
    mean_score = sum(all_scores) / len(all_scores)
    result = {}
    for c in range(num_segments):
        cluster_mask = np.zeros_like(clusters)
        cluster_mask[clusters == c] = 1
        scores = [(cluster_mask * normalized[:, :, i]).sum() / cluster_mask.sum() for i in range(nouns_maps.shape[-1])]
        result[c] = int(np.argmax(np.array(scores))) if max(scores) > 1.4 * mean_score else "BG"
    return result


def test_label_clusters_with_two_nouns_is_the_authors_rule():
    # cluster 2 scores best for noun 1, cluster 0 for noun 0; clusters 1, 3 are background
    scores = [[0.8, 0.3], [0.1, 0.12], [0.2, 0.9], [0.1, 0.05]]
    assert label_clusters(scores) == [0, None, 1, None]
    # the bar is over every cluster's best score (noun 1's 0.9 is left out, 0.8 is in it):
    # 1.4 * mean(0.8, 0.12, 0.1) = 0.476 < 0.8
    assert label_clusters([[0.8, 0.3], [0.1, 0.12], [0.2, 0.9], [0.1, 0.05]], ratio=2.5) == [None, None, 1, None]


def test_object_mask_with_two_nouns_matches_the_authors_cluster2noun():
    """Two planted objects, two noun maps: a cluster goes to the noun of its best score (the authors'
    rule); scoring only the object noun's map (one noun) would also take the other object's cluster."""
    from attention_lab.attention_patches.segmentation import kmeans_segments

    h = w = 8
    groups = (torch.arange(h * w).reshape(h, w) // (3 * w)).clone()  # three background bands: five groups
    groups[1:4, 1:4] = 8  # object A
    groups[5:8, 5:8] = 9  # object B
    attention = (groups.reshape(-1)[:, None] == groups.reshape(-1)[None, :]).double()
    attention = attention / attention.sum(-1, keepdim=True)
    noun_a = torch.full((h, w), 0.05)
    noun_a[1:4, 1:4], noun_a[5:8, 5:8] = 1.0, 0.6  # A's word also leaks onto B
    noun_b = torch.full((h, w), 0.05)
    noun_b[5:8, 5:8] = 1.0
    labels = kmeans_segments(attention, (h, w), 5, 1)
    authors = authors_cluster2noun(labels.numpy(), torch.stack([noun_a, noun_b], -1).double().numpy(), 5)
    expected = torch.tensor([authors[int(c)] == 0 for c in labels.reshape(-1)]).reshape(h, w)
    mask = object_mask(attention, (h, w), [noun_a, noun_b], clusters=5, object_nouns=(0,))
    assert torch.equal(mask.bool(), expected)
    assert torch.equal(expected, groups == 8)
    # one noun: B's cluster (0.6) beats 1.4x the background's mean as well
    assert object_mask(attention, (h, w), noun_a, clusters=5).bool()[6, 6]


def test_object_mask_on_planted_attention():
    """Tokens in a planted square attend only among themselves, and the object word's map covers that
    square: the mask is the square."""
    h = w = 8
    region = torch.zeros(h, w, dtype=torch.bool)
    region[2:6, 2:6] = True
    bands = torch.arange(h * w).reshape(h, w) // (2 * w)  # four background bands, each its own group
    groups = torch.where(region, torch.full_like(bands, 9), bands).reshape(-1)
    attention = (groups[:, None] == groups[None, :]).double()
    attention = attention / attention.sum(-1, keepdim=True)
    noun = torch.full((4, 4), 0.05)  # a coarser cross-attention grid, as the authors' 32² map for 64² clusters
    noun[1:3, 1:3] = 1.0
    mask = object_mask(attention, (h, w), noun, clusters=5)
    assert torch.equal(mask.bool(), region)


def authors_step_plan(steps=68, swap_guidance_scale=3.5):
    """What garibida/cross-image-attention runs at each denoising step i, transcribed:
    `AppearanceTransferModel.get_adain_callback` sets `self.step = st` after step i, so step i's attention
    reads `model.step` = i − 1 (0 at i = 0); `should_mix_keys_and_values` swaps where
    `cross_attn_64_range.start (10) <= model.step < end (90)`; the structure's keys when
    `model.step % 5 == 0 and model.step < 40`; the pipeline's swap guidance uses i itself
    (`cross_image_attention_range.start <= i <= end`, λ = linspace(3.5, max(3.5/2, 1), n)[count])."""
    plan, model_step = [], 0
    strengths = [swap_guidance_scale + (max(swap_guidance_scale / 2, 1.0) - swap_guidance_scale) * k / (steps - 1)
                 for k in range(steps)]
    for i in range(steps):
        swap = 10 <= model_step < 90
        source = ("structure" if model_step % 5 == 0 and model_step < 40 else "appearance") if swap else None
        guidance = strengths[i] if 10 <= i <= 90 else None
        plan.append((swap, source, guidance))
        model_step = i  # the step-end callback
    return plan


def test_schedule_reproduces_what_the_authors_code_runs():
    s = CrossImageSchedule(68)
    plan = authors_step_plan()
    assert [k for k in range(68) if s.swaps(k)] == [i for i, (swap, _, _) in enumerate(plan) if swap] == list(range(11, 68))
    assert [k for k in range(68) if s.swaps(k) and s.source(k) == STRUCTURE] == [11, 16, 21, 26, 31, 36]
    assert all(s.source(k) == source for k, (swap, source, _) in enumerate(plan) if swap)
    # swap guidance reads the step itself; at step 10 the authors' swap and no-swap passes are equal,
    # so their guided prediction is the plain one, as the pack's (no swap, no extra call)
    assert all(math.isclose(s.guidance_scale(k), plan[k][2]) for k in range(11, 68))
    assert s.adain_step == 20
    assert CrossImageSchedule(68, guidance=1.0).guidance_scale(10) is None
    assert CrossImageSchedule(68, adain=False).adain_step is None
    assert not any(CrossImageSchedule(68, structure_every=0).source(k) == STRUCTURE for k in range(68))
    with pytest.raises(ValueError, match="swap_start"):
        CrossImageSchedule(10, swap_start=0.8, swap_end=0.5)
    with pytest.raises(ValueError, match="swap_guidance"):
        CrossImageSchedule(10, guidance=0.5)
    with pytest.raises(ValueError, match="attention_lag"):
        CrossImageSchedule(10, attention_lag=2)


def test_schedule_without_the_lag_is_the_papers_stated_steps():
    s = CrossImageSchedule(68, attention_lag=0)
    assert [k for k in range(68) if s.swaps(k)] == list(range(10, 68))
    assert [k for k in range(68) if s.swaps(k) and s.source(k) == STRUCTURE] == [10, 15, 20, 25, 30, 35]
    assert s.source(11) == APPEARANCE and s.source(40) == APPEARANCE


# -- the technique on planted calls ----------------------------------------------------


def make_call(batch, cond_or_uncond, step_pass, tokens=16):
    return AttentionCall(
        layer=LAYER, ordinal=0, num_layers=1, is_self=True, height=4, width=tokens // 4, heads=HEADS, dim_head=DIM,
        step=0, total_steps=10, sigma=1.0, layout=ChunkLayout.of(batch, cond_or_uncond),
        options={PASS_KEY: step_pass},
    )


def qkv(batch, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, HEADS * DIM, generator=g) for _ in range(3)]


@pytest.mark.parametrize("cond_or_uncond, swap_conds", [
    ([0], (0,)),  # cfg 1, no swap guidance: one output row, swapped
    ([0, 1], (0,)),  # swap guidance ([swap, no swap]) or text CFG ([cond, uncond])
    ([1, 0], (0,)),  # another order of the same chunks
    ([1], (0,)),  # a memory split call holding only the unswapped chunk
])
@pytest.mark.parametrize("images, source_images", [(1, 1), (2, 1), (2, 2)])
@pytest.mark.parametrize("gamma", [1.0, 1.67])
def test_technique_swaps_exactly_the_named_conds(cond_or_uncond, swap_conds, images, source_images, gamma):
    technique = CrossImageAttention([LAYER], gamma)
    sq, sk, sv = qkv(source_images, 20, seed=1)  # a source image of another size (20 tokens)
    source = make_call(source_images, [0], CrossImagePass(SOURCE), tokens=20)
    assert technique.wants(source)
    assert torch.allclose(technique(sq, sk, sv, source, attend), attend(sq, sk, sv))  # the source attends as usual

    batch = images * len(cond_or_uncond)
    q, k, v = qkv(batch, 16, seed=2)
    out = technique(q, k, v, make_call(batch, cond_or_uncond, CrossImagePass.output_of(source.options[PASS_KEY],
                                                                                      swap_conds)), attend)
    for position, value in enumerate(cond_or_uncond):
        for i in range(images):
            row = position * images + i
            if value in swap_conds:
                src = i if source_images == images else 0
                expected = paper_contrasted(q[row:row + 1], sk[src:src + 1], sv[src:src + 1], gamma)
            else:
                expected = softmax_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], HEADS)
            assert torch.allclose(out[row:row + 1].double(), expected, atol=1e-5), (position, i)


def test_technique_ignores_other_layers_and_calls_without_a_pass():
    technique = CrossImageAttention([LAYER])
    call = make_call(1, [0], CrossImagePass(OUTPUT, (0,)))
    assert technique.wants(call)
    call.options = {}
    assert not technique.wants(call)
    other = make_call(1, [0], CrossImagePass(OUTPUT, (0,)))
    other.layer = ("output", 3, 0)
    assert not technique.wants(other)


def test_technique_errors():
    technique = CrossImageAttention([LAYER])
    q, k, v = qkv(1, 16, seed=3)
    output = make_call(1, [0], CrossImagePass(OUTPUT, (0,)))
    with pytest.raises(RuntimeError, match="no source keys"):
        technique(q, k, v, output, attend)
    source = CrossImagePass(SOURCE)
    technique(*qkv(3, 16, seed=4), make_call(3, [0], source), attend)
    with pytest.raises(ValueError, match="3 source images for 2 output images"):
        technique(*qkv(2, 16, seed=5), make_call(2, [0], CrossImagePass.output_of(source, (0,))), attend)
    with pytest.raises(ValueError, match="masks this self-attention"):
        technique(q, k, v, output, attend, mask=torch.zeros(16, 16))
    # what one step's source call stored is that step's: a later step's output pass does not see it
    assert set(source.keys_values) == {LAYER}
    with pytest.raises(RuntimeError, match="no source keys"):
        technique(q, k, v, make_call(1, [0], CrossImagePass(OUTPUT, (0,))), attend)
    with pytest.raises(ValueError, match="contrast"):
        CrossImageAttention([LAYER], 0.0)
