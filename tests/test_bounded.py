"""Bounded Attention's masks, losses and guidance on planted layouts: no ComfyUI needed."""

import itertools

import pytest
import torch
from attention_reference import softmax_attention

from attention_lab.attention_patches import AttentionRouter
from attention_lab.attention_patches import backend as ba_backend
from attention_lab.attention_patches import bounded as ba

HEADS = 2
# 4x4 grid: subject 0 in the left two columns' top half, subject 1 in the right
# two columns, rows 1-2; the other cells are background.
BOXES = ((0.0, 0.0, 0.5, 0.5), (0.5, 0.25, 1.0, 0.75))
# "a red cube and a blue ball": SOT, a, red, cube, and, a, blue, ball, EOS
LAYOUT = ba.BoundedLayout(boxes=BOXES, subject_tokens=((2, 3), (6, 7)), eos_token=8, filter_tokens=(1, 4, 5))


def cells(box, h=4, w=4):
    """Grid cells of a box, edges rounded as the authors round them (half to even)."""
    x0, y0, x1, y1 = box
    rows, cols = range(round(y0 * h), round(y1 * h)), range(round(x0 * w), round(x1 * w))
    return {r * w + c for r in rows for c in cols}


def test_box_masks_rasterise_like_the_authors():
    # run_sd.py's first box on a 16x16 grid: rows round(3.2):round(12.8) = 3:13, columns round(0.8):round(7.2) = 1:7
    mask = ba.box_masks([(0.05, 0.2, 0.45, 0.8)], 16, 16)[0].view(16, 16)
    assert mask.sum() == 10 * 6 and mask[3:13, 1:7].all()
    # half-way edges round half to even, as Python's round: 0.125*4 = 0.5 -> 0, 0.625*4 = 2.5 -> 2
    # (rounding half up would give columns 1:3)
    assert ba.box_masks([(0.125, 0.0, 0.625, 1.0)], 1, 4)[0].tolist() == [True, True, False, False]
    # non-square grids: x by width, y by height
    assert ba.box_masks([(0.5, 0.0, 1.0, 0.5)], 2, 6)[0].view(2, 6).tolist() == [[False] * 3 + [True] * 3, [False] * 6]


def test_a_box_never_vanishes_on_a_coarse_grid():
    # a 0.25-wide box on the 2x2 middle block of a 16x16 latent: rows and columns round(0.6):round(1.1) = 1:1
    # are empty; the cell holding its centre (0.425·2 -> 0) stands for it, else its tokens would be closed everywhere
    assert ba.box_masks([(0.3, 0.3, 0.55, 0.55)], 2, 2)[0].tolist() == [True, False, False, False]
    # one empty axis only: the other keeps its rounded span (columns round(0.2):round(3.6) = 0:4, row of 0.425·4 -> 1)
    assert ba.box_masks([(0.05, 0.4, 0.9, 0.45)], 4, 4)[0].view(4, 4).nonzero()[:, 0].unique().tolist() == [1]
    assert ba.box_masks([(0.05, 0.4, 0.9, 0.45)], 4, 4)[0].sum() == 4


@pytest.mark.parametrize("guiding", [False, True], ids=["denoising", "guidance-pass"])
def test_cross_mask_who_sees_which_token(guiding):
    regions = ba.box_masks(BOXES, 4, 4)
    allowed = ba.cross_attention_allowed(LAYOUT, regions, 77, include_background=guiding)
    inside = [cells(b) for b in BOXES]
    background = set(range(16)) - inside[0] - inside[1]
    assert len(inside[0]) == 4 and len(inside[1]) == 4 and len(background) == 8
    for query, token in itertools.product(range(16), range(77)):
        if token in (2, 3):  # subject 0's words
            expected = query in inside[0] or (guiding and query in background)
        elif token in (6, 7):
            expected = query in inside[1] or (guiding and query in background)
        elif token in LAYOUT.filter_tokens:
            expected = False
        elif token == LAYOUT.eos_token:
            expected = query not in background or guiding
        else:  # SOT, padding
            expected = True
        assert bool(allowed[query, token]) == expected, (query, token)


def test_cross_mask_repeats_per_text_chunk_and_refuses_odd_lengths():
    regions = ba.box_masks(BOXES, 4, 4)
    allowed = ba.cross_attention_allowed(LAYOUT, regions, 154, include_background=False)
    assert torch.equal(allowed[:, :77], allowed[:, 77:])
    with pytest.raises(ValueError, match="77-token chunks"):
        ba.cross_attention_allowed(LAYOUT, regions, 80, include_background=False)


def test_self_mask_who_sees_whom_with_overlap():
    boxes = ((0.0, 0.0, 0.75, 0.5), (0.5, 0.0, 1.0, 1.0))  # overlapping in column 2, rows 0-1
    inside = [cells(b) for b in boxes]
    allowed = ba.self_attention_allowed(ba.box_masks(boxes, 4, 4))
    background = set(range(16)) - inside[0] - inside[1]
    for query, key in itertools.product(range(16), range(16)):
        mine = [s for s in range(2) if query in inside[s]]
        expected = not mine or key in background or any(key in inside[s] for s in mine)
        assert bool(allowed[query, key]) == expected, (query, key)
    assert inside[0] & inside[1]  # the overlap exists and sees both subjects
    q = next(iter(inside[0] & inside[1]))
    assert allowed[q].all()


def test_additive_masks_use_finfo_min():
    allowed = torch.tensor([[True, False]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        m = ba.additive(allowed, dtype)
        assert m.dtype == dtype and m[0, 0] == 0 and m[0, 1] == torch.finfo(dtype).min and torch.isfinite(m).all()


# -- the technique on the router --------------------------------------------------------


def options(hw=(4, 4), cond_or_uncond=(1, 0), batch=2):
    return {"n_heads": HEADS, "dim_head": 8, "activations_shape": [batch, 16, *hw], "cond_or_uncond": list(cond_or_uncond)}


def reference(q, k, v, mask=None):
    return softmax_attention(q, k, v, HEADS, mask)


LAYERS = [("input", 1, 0), ("middle", 0, 0), ("output", 3, 0)]


@pytest.mark.parametrize("cond_or_uncond", [(1, 0), (0,), (0, 1)])
def test_technique_masks_cond_rows_of_cross_and_every_row_of_self(cond_or_uncond):
    router = AttentionRouter(LAYERS)
    router.add(ba.BoundedAttention(LAYOUT))
    batch = len(cond_or_uncond)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 16, HEADS * 8, generator=g)
    context = torch.randn(batch, 77, HEADS * 8, generator=g)
    regions = ba.box_masks(BOXES, 4, 4)
    cross = ba.additive(ba.cross_attention_allowed(LAYOUT, regions, 77, False), torch.float32)
    selfm = ba.additive(ba.self_attention_allowed(regions), torch.float32)

    out = router.patch_for(LAYERS[1], is_self=False)(q, context, context, options(cond_or_uncond=cond_or_uncond, batch=batch))
    for row, kind in enumerate(cond_or_uncond):
        expected = reference(q[row:row + 1], context[row:row + 1], context[row:row + 1], cross if kind == 0 else None)
        assert torch.allclose(out[row:row + 1].double(), expected, atol=1e-5), (row, kind)

    out = router.patch_for(LAYERS[1], is_self=True)(q, q, q, options(cond_or_uncond=cond_or_uncond, batch=batch))
    assert torch.allclose(out.double(), reference(q, q, q, selfm), atol=1e-5)


class PhaseStub:
    """Stands for the guidance probe: only whether a guidance pass is running."""

    def __init__(self, collecting: bool):
        self.collecting = collecting


def bounded_pair(layout, collecting=False, start_refined=None):
    """(gathered, masked) routers with the same technique state; `masked` is forced to the additive-mask path."""
    refinement = ba.MaskRefinement(layout, {LAYERS[0]})  # not on the router: the test sets its regions
    if start_refined is not None:
        refinement.refined, refinement.refined_grid = start_refined, (4, 4)
        refinement.revision += 1
    calls = {"gathered": [], "masked": []}
    routers = {}
    for path, whole_call in (("gathered", False), ("masked", True)):
        def spy(q, k, v, heads, mask=None, _seen=calls[path], **kwargs):
            _seen.append((q.shape[0], q.shape[1], k.shape[1], None if mask is None else tuple(mask.shape)))
            return ba_backend.sdpa_attention(q, k, v, heads, mask=mask)

        router = AttentionRouter(LAYERS, attention=spy)
        technique = router.add(ba.BoundedAttention(layout, guidance=PhaseStub(collecting), refinement=refinement))
        technique.inner_wants = lambda call, whole_call=whole_call: whole_call
        routers[path] = router
    return routers, calls


OVERLAPPING = ba.BoundedLayout(boxes=((0.0, 0.0, 0.75, 0.5), (0.5, 0.0, 1.0, 1.0)),
                               subject_tokens=((2, 3), (6, 7)), eos_token=8, filter_tokens=(1, 4, 5))


@pytest.mark.parametrize("layout", [LAYOUT, OVERLAPPING], ids=["disjoint", "overlapping"])
@pytest.mark.parametrize("refined", [False, True], ids=["boxes", "refined"])
@pytest.mark.parametrize("cond_or_uncond", [(1, 0), (0,), (1,), (0, 1, 0)])
@pytest.mark.parametrize("collecting", [False, True], ids=["denoising", "guidance-pass"])
@pytest.mark.parametrize("outer", [False, True], ids=["no-outer-mask", "outer-mask"])
def test_gathered_attention_equals_the_masked_call(layout, refined, cond_or_uncond, collecting, outer):
    images = 2
    batch = len(cond_or_uncond) * images
    boxes = ba.box_masks(layout.boxes, 4, 4)
    regions = torch.stack([boxes, boxes.roll(1, -1)]) if refined else None  # other regions per image
    routers, calls = bounded_pair(layout, collecting, regions)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(batch, 16, HEADS * 8, generator=g) for _ in range(3))
    context = torch.randn(batch, 154, HEADS * 8, generator=g)  # two text chunks
    outer_masks = {True: torch.randn(batch, 1, 16, 16, generator=g), False: torch.randn(1, 1, 16, 154, generator=g)}
    opts = options(cond_or_uncond=cond_or_uncond, batch=batch)
    for is_self, keys in ((True, k), (False, context)):
        mask = outer_masks[is_self] if outer else None
        results = {path: router.patch_for(LAYERS[0], is_self=is_self)(q, keys, keys if not is_self else v, opts, mask=mask)
                   for path, router in routers.items()}
        assert (results["gathered"] - results["masked"]).abs().max() <= 1e-5, is_self
    # the gathered path hands the backend only allowed keys, and a mask only where one came from further out
    assert all(rows * queries <= batch * 16 for rows, queries, _, _ in calls["gathered"])
    assert any(keys not in (16, 154) for _, _, keys, _ in calls["gathered"])
    assert all((m is None) != outer for *_, m in calls["gathered"])
    assert all(m is not None for *_, m in calls["masked"])


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_gathered_attention_equals_the_masked_call_in_half_precision(dtype, tolerance):
    routers, _ = bounded_pair(OVERLAPPING)
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(4, 16, HEADS * 8, generator=g).to(dtype) for _ in range(3))
    context = torch.randn(4, 77, HEADS * 8, generator=g).to(dtype)
    opts = options(cond_or_uncond=(1, 0), batch=4)
    for is_self, (keys, values) in ((True, (k, v)), (False, (context, context))):
        gathered, masked = (router.patch_for(LAYERS[0], is_self=is_self)(q, keys, values, opts) for router in routers.values())
        assert gathered.dtype == dtype and torch.isfinite(gathered).all()
        exact = softmax_attention(q, keys, values, HEADS, None)  # scale of the values
        assert (gathered.double() - masked.double()).abs().max() <= tolerance * exact.abs().max(), is_self


def test_self_and_cross_attention_need_no_mask_of_the_calls_size():
    # per group of queries one backend call over the keys that group sees: no [B, N, keys] or N×N tensor
    routers, calls = bounded_pair(LAYOUT)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 16, HEADS * 8, generator=g)
    context = torch.randn(2, 77, HEADS * 8, generator=g)
    regions = ba.box_masks(BOXES, 4, 4)
    opts = options(cond_or_uncond=(1, 0), batch=2)
    routers["gathered"].patch_for(LAYERS[0], is_self=False)(q, context, context, opts)
    # the unconditional row over every token; then background, subject 0, subject 1 on the conditional row
    background = (~regions.any(0)).sum().item()
    open_tokens = 77 - 2 - 2 - 3  # SOT, padding and EOS: not the subjects' or the filter words' tokens
    assert sorted(calls["gathered"]) == sorted([(1, 16, 77, None), (1, background, open_tokens - 1, None),
                                                (1, 4, open_tokens + 2, None), (1, 4, open_tokens + 2, None)])
    calls["gathered"].clear()
    routers["gathered"].patch_for(LAYERS[0], is_self=True)(q, q, q, opts)
    # background queries see every key; a subject's queries its own cells and the background
    assert sorted(calls["gathered"]) == sorted([(2, background, 16, None), (2, 4, background + 4, None),
                                                (2, 4, background + 4, None)])


# -- losses -----------------------------------------------------------------------------


def direct_bounded_loss(layers, layout):
    """docs/methods.md §3 with loops: per layer, per image and subject, sums over pixels and keys."""
    s_count = layout.subjects
    terms = {}
    for is_self in (False, True):
        fgs, bgs = [], []
        for l in (l for l in layers if l.is_self == is_self):
            h, w = l.height, l.width
            boxes = [cells(b, h, w) for b in layout.boxes]
            bgc = set(range(h * w)) - set().union(*boxes)
            fg = torch.zeros(l.probs.shape[0], s_count, dtype=torch.float64)
            bg = torch.zeros_like(fg)
            for b in range(l.probs.shape[0]):
                for s in range(s_count):
                    keys = sorted(boxes[s]) if is_self else list(layout.subject_tokens[s]) + [layout.eos_token]
                    fg[b, s] = sum(l.probs[b, i, j] for i in boxes[s] for j in keys)
                    bg[b, s] = sum(l.probs[b, i, j] for i in bgc for j in keys)
            fgs.append(fg)
            bgs.append(bg)
        fg, bg = sum(fgs) / len(fgs), sum(bgs) / len(bgs)
        terms[is_self] = ((1 - fg / (fg + s_count * bg)) ** 2).sum()
    return 1.5 * terms[False] + 0.5 * terms[True]


def planted_probs(seed, grids=((4, 4), (2, 2)), batch=2):
    g = torch.Generator().manual_seed(seed)
    logits = []
    for (h, w), is_self in itertools.product(grids, (False, True)):
        keys = h * w if is_self else 77
        logits.append((is_self, h, w, (torch.randn(batch, h * w, keys, generator=g, dtype=torch.float64) * 2).requires_grad_()))
    return logits


def test_bounded_loss_and_gradient_match_a_direct_implementation():
    raw = planted_probs(1)
    layers = [ba.LayerProbs(s, h, w, (x * 1.0).softmax(-1) * HEADS) for s, h, w, x in raw]
    loss, normalized = ba.BoundedLoss()(layers, LAYOUT)
    direct = direct_bounded_loss(layers, LAYOUT)
    assert torch.allclose(loss, direct, rtol=1e-10) and torch.allclose(normalized, direct / (2 * 2))
    grads = torch.autograd.grad(loss, [x for *_, x in raw])
    direct_grads = torch.autograd.grad(direct_bounded_loss(
        [ba.LayerProbs(s, h, w, x.softmax(-1) * HEADS) for s, h, w, x in raw], LAYOUT), [x for *_, x in raw])
    for a, b in zip(grads, direct_grads):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12) and a.abs().max() > 0


def test_bounded_loss_is_zero_when_attention_stays_in_the_boxes():
    h = w = 4
    boxes = ba.box_masks(BOXES, h, w)
    background = ~boxes.any(0)
    cross = torch.full((1, 16, 77), 1e-9, dtype=torch.float64)
    cross[0, boxes[0], 2] = cross[0, boxes[1], 6] = 1.0
    cross[0, background, 0] = 1.0
    selfp = torch.eye(16, dtype=torch.float64)[None]
    loss, _ = ba.BoundedLoss()([ba.LayerProbs(False, h, w, cross), ba.LayerProbs(True, h, w, selfp)], LAYOUT)
    assert loss < 1e-12
    leaked = cross.clone()
    leaked[0, background, 2] = 1.0  # subject 0's word all over the background
    assert ba.BoundedLoss()([ba.LayerProbs(False, h, w, leaked), ba.LayerProbs(True, h, w, selfp)], LAYOUT)[0] > 0.1


def authors_compute_ca_loss(attn_maps, bboxes, object_positions):
    """silent-chen/layout-guidance utils.compute_ca_loss, transcribed (mid and up maps in one list;
    each map `[batch·heads, i, j]`)."""
    loss = 0
    object_number = len(bboxes)
    for attn_map in attn_maps:
        b, i, j = attn_map.shape
        H = W = int(i ** 0.5)
        for obj_idx in range(object_number):
            obj_loss = 0
            mask = torch.zeros(size=(H, W), dtype=attn_map.dtype)
            for obj_box in bboxes[obj_idx]:
                x_min, y_min, x_max, y_max = int(obj_box[0] * W), int(obj_box[1] * H), int(obj_box[2] * W), int(obj_box[3] * H)
                mask[y_min: y_max, x_min: x_max] = 1
            for obj_position in object_positions[obj_idx]:
                ca_map_obj = attn_map[:, :, obj_position].reshape(b, H, W)
                activation_value = (ca_map_obj * mask).reshape(b, -1).sum(dim=-1) / ca_map_obj.reshape(b, -1).sum(dim=-1)
                obj_loss += torch.mean((1 - activation_value) ** 2)
            loss += (obj_loss / len(object_positions[obj_idx]))
    loss = loss / (object_number * len(attn_maps))
    return loss


def test_layout_guidance_loss_is_the_authors_compute_ca_loss():
    # boxes whose edges floor and round differently on a 4x4 grid (0.15·4 = 0.6, 0.65·4 = 2.6),
    # subjects of one and two tokens, two layers, heads with different maps
    layout = ba.BoundedLayout(boxes=((0.1, 0.15, 0.6, 0.65), (0.5, 0.4, 0.95, 0.9)), subject_tokens=((3,), (6, 7)),
                              eos_token=8)
    g = torch.Generator().manual_seed(4)
    heads = [(torch.randn(1, HEADS, 16, 77, generator=g, dtype=torch.float64) * 3).softmax(-1) for _ in range(2)]
    layers = [ba.LayerProbs.from_heads(False, 4, 4, h, keep_heads=True) for h in heads]
    loss, normalized = ba.LayoutGuidanceLoss()(layers, layout)
    expected = authors_compute_ca_loss([h.flatten(0, 1) for h in heads], [[b] for b in layout.boxes],
                                       [list(t) for t in layout.subject_tokens])
    assert torch.allclose(loss, expected, rtol=1e-12) and torch.allclose(normalized, expected)
    # summing the heads first (one ratio of the head-summed map) is another loss
    summed = authors_compute_ca_loss([h.sum(1) for h in heads], [[b] for b in layout.boxes],
                                     [list(t) for t in layout.subject_tokens])
    assert not torch.allclose(loss, summed, rtol=1e-3)


def test_layout_guidance_rasterises_boxes_by_flooring():
    assert ba.floor_box_masks([(0.1, 0.15, 0.6, 0.65)], 4, 4)[0].view(4, 4).nonzero().tolist() == [
        [r, c] for r in (0, 1) for c in (0, 1)]  # int(0.6) = 0 : int(2.6) = 2 rows, int(0.4) = 0 : int(2.4) = 2 columns


def test_layout_guidance_sums_images():
    g = torch.Generator().manual_seed(6)
    heads = (torch.randn(2, HEADS, 16, 77, generator=g, dtype=torch.float64) * 3).softmax(-1)
    both = ba.LayoutGuidanceLoss()([ba.LayerProbs.from_heads(False, 4, 4, heads, keep_heads=True)], LAYOUT)[0]
    each = [ba.LayoutGuidanceLoss()([ba.LayerProbs.from_heads(False, 4, 4, heads[i:i + 1], keep_heads=True)], LAYOUT)[0]
            for i in range(2)]
    assert torch.allclose(both, each[0] + each[1])


def authors_gaussian_kernel(kernel_size=3, sigma=0.5):
    """Attend-and-Excite utils/gaussian_smoothing.py, transcribed (dim 2)."""
    import math
    kernel = 1
    meshgrids = torch.meshgrid([torch.arange(kernel_size, dtype=torch.float32)] * 2, indexing="ij")
    for size, std, mgrid in zip([kernel_size] * 2, [sigma] * 2, meshgrids):
        mean = (size - 1) / 2
        kernel *= 1 / (std * math.sqrt(2 * math.pi)) * torch.exp(-((mgrid - mean) / (2 * std)) ** 2)
    return kernel / torch.sum(kernel)


def test_attend_and_excite_smoothing_is_the_authors_kernel():
    g = ba.gaussian_kernel(3, 0.5)
    # exp(-x²/(4σ²)) at σ 0.5: exp(-1) at ±1 (a kernel exp(-x²/(2σ²)) would give .107, .787, .107)
    assert torch.allclose(g, torch.tensor([0.2119, 0.5761, 0.2119]), atol=1e-4)
    maps = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(2))
    # their call: pad (1, 1, 1, 1) reflect, then the depthwise conv with their kernel
    theirs = torch.nn.functional.conv2d(torch.nn.functional.pad(maps[:, None], (1, 1, 1, 1), mode="reflect"),
                                        authors_gaussian_kernel()[None, None])[:, 0]
    assert torch.allclose(ba.gaussian_smooth(maps), theirs, atol=1e-6)


def test_attend_and_excite_loss_is_the_most_neglected_subject():
    h = w = 4
    probs = torch.full((1, 16, 77), 1e-6, dtype=torch.float64)
    probs[0, :, 0] = 1.0
    probs[0, 5, 3] = 50.0  # subject 0's leading token peaks at one cell; subject 1 ("ball", 7) is neglected
    layer = ba.LayerProbs(False, h, w, probs * HEADS)
    loss, _ = ba.AttendExciteLoss()([layer], LAYOUT)
    text = (probs[0, :, 1:8] / probs[0].sum(-1, keepdim=True) * 100).softmax(-1)
    peak = [ba.gaussian_smooth(text[:, t - 1].reshape(1, 4, 4)).max() for t in LAYOUT.leading_tokens]
    assert torch.allclose(loss, max(1 - peak[0], 1 - peak[1])) and peak[1] < peak[0]


def test_step_size_schedule_and_config_errors():
    c = ba.GuidanceConfig()
    assert (c.step_size(0), c.step_size(15)) == (8.0, 2.0) and c.step_size(5) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="guidance loss must be one of"):
        ba.GuidanceConfig(loss="boxdiff")


def test_layout_errors():
    with pytest.raises(ValueError, match="outside"):
        ba.check_box([0.1, 0.2, 1.2, 0.5], "box 'cat'")
    with pytest.raises(ValueError, match="empty"):
        ba.check_box([0.5, 0.2, 0.5, 0.6])
    with pytest.raises(ValueError, match="3 boxes for 2 subjects"):
        ba.BoundedLayout(boxes=BOXES + ((0, 0, 1, 1),), subject_tokens=((1,), (2,)), eos_token=3)


def test_families_and_their_loss_layers():
    sd15 = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)]
    sdxl = ([("input", b, i) for b in (4, 5) for i in range(2)] + [("input", b, i) for b in (7, 8) for i in range(10)]
            + [("middle", 0, i) for i in range(10)] + [("output", b, i) for b in range(3) for i in range(10)]
            + [("output", b, i) for b in (3, 4, 5) for i in range(2)])
    assert ba.unet_family(sd15) == "sd15" and ba.unet_family(sdxl) == "sdxl"
    assert len(ba.LOSS_LAYERS["sd15"]) == 4 and len(ba.LOSS_LAYERS["sdxl"]) == 6
    with pytest.raises(ba.UnsupportedFamilyError, match="SDXL"):
        ba.unet_family([("input", 1, 0), ("output", 0, 0)])


def test_loss_layers_below_the_authors_size_add_the_layers_at_their_grids():
    sd15 = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)]
    assert ba.loss_layers_for("sd15", (64, 64), sd15) == ba.LOSS_LAYERS["sd15"]  # 512 px: the authors' blocks
    assert ba.loss_layers_for("sd15", (96, 128), sd15) == ba.LOSS_LAYERS["sd15"]
    # 128 px: middle 2², output 3-5 4², and every layer at the authors' 8² and 16²: all but input 7-8 (4²)
    assert ba.loss_layers_for("sd15", (16, 16), sd15) == frozenset(sd15) - {("input", 7, 0), ("input", 8, 0)}
    # 256 px: the 8² (input 7-8, output 3-5) and 16² (input 4-5, output 6-8) layers join the middle block
    assert ba.loss_layers_for("sd15", (32, 32), sd15) == ba.LOSS_LAYERS["sd15"] | {
        ("input", 7, 0), ("input", 8, 0), ("input", 4, 0), ("input", 5, 0), ("output", 6, 0), ("output", 7, 0),
        ("output", 8, 0)}


# -- guidance on a tiny attention model ---------------------------------------------------


class TinyAttentionNet(torch.nn.Module):
    """Latent -> tokens -> self-attention and cross-attention through the router, twice (two 'loss layers')."""

    def __init__(self, router, channels=4, dim=HEADS * 8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.router = router
        self.inp = torch.nn.Linear(channels, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in LAYERS)
        self.kv = torch.nn.ModuleList(torch.nn.Linear(dim, 2 * dim) for _ in LAYERS)
        self.q2 = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in LAYERS)
        self.context = torch.nn.Parameter(torch.randn(1, 77, dim))

    def forward(self, z, cond_or_uncond=(0,)):
        b, c, h, w = z.shape
        x = self.inp(z.flatten(2).transpose(1, 2))
        opts = options((h, w), cond_or_uncond, b)
        context = self.context.expand(b, -1, -1)
        for i, layer in enumerate(LAYERS):
            q, k, v = self.qkv[i](x).chunk(3, -1)
            x = x + self.router.patch_for(layer, True)(q, k, v, opts)
            k2, v2 = self.kv[i](context).chunk(2, -1)
            x = x + self.router.patch_for(layer, False)(self.q2[i](x), k2, v2, opts)
        return x


# Layout Guidance's loss is a mean over subjects and layers (4 here), the others sum: a step size per loss
STEP_SIZES = {"bounded": 200.0, "layout_guidance": 800.0, "attend_and_excite": 400.0}


def guidance_setup(loss="bounded", inference=False):
    router = AttentionRouter(LAYERS)
    config = ba.GuidanceConfig(loss=loss, iterations=6, loss_threshold=0.0, step_size_start=STEP_SIZES[loss],
                               step_size_end=STEP_SIZES[loss])
    probe = ba.GuidanceProbe(LAYOUT, {LAYERS[1], LAYERS[2]}, config)
    router.add(ba.BoundedAttention(LAYOUT, guidance=probe))
    router.add(probe)
    if inference:
        with torch.inference_mode():
            net = TinyAttentionNet(router)
            z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    else:
        net = TinyAttentionNet(router)
        z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    return router, probe, net, z


@pytest.mark.parametrize("loss", ["bounded", "layout_guidance", "attend_and_excite"])
def test_guidance_lowers_the_loss_on_a_tiny_model(loss):
    router, probe, net, z = guidance_setup(loss)
    z_new, losses = ba.guided_latent(net, probe, z, step=0, ordinals=router.ordinal)
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] * 0.9, losses
    assert not z_new.requires_grad and z_new.grad_fn is None and not torch.equal(z_new, z)
    assert probe.collected is None and not probe.collecting  # the pass closed


def test_guidance_stops_at_the_loss_layers_and_early():
    router, probe, net, z = guidance_setup()
    seen = []
    net_forward = net.forward

    def forward(z):
        seen.append("start")
        out = net_forward(z)
        seen.append("finished")  # never reached: the last loss layer ends the pass
        return out

    probe.config = ba.GuidanceConfig(iterations=5, loss_threshold=10.0)  # any loss is below: one iteration
    _, losses = ba.guided_latent(forward, probe, z, step=0, ordinals=router.ordinal)
    assert len(losses) == 1 and seen == ["start"]


def test_guidance_runs_inside_inference_mode_with_inference_weights():
    router, probe, net, z = guidance_setup(inference=True)
    assert net.inp.weight.is_inference() and z.is_inference()
    with torch.inference_mode():
        z_new, losses = ba.guided_latent(net, probe, z, step=3, ordinals=router.ordinal)
    assert losses[-1] < losses[0] and not torch.equal(z_new, z)


def test_sampler_consistent_denoised_reproduces_the_guided_euler_step():
    g = torch.Generator().manual_seed(0)
    x, x_guided, d_guided = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([3.0, 3.0]), 2.0
    d = ba.sampler_consistent_denoised(d_guided, x, x_guided, sigma, sigma_next)

    def euler(x, d):
        return x + (x - d) / 3.0 * (sigma_next - 3.0)

    assert torch.allclose(euler(x, d), euler(x_guided, d_guided), atol=1e-5)
    assert torch.equal(ba.sampler_consistent_denoised(d_guided, x, x_guided, sigma, 0.0), d_guided)


def test_guidance_copies_each_inference_tensor_once_per_step_and_gets_the_gradient():
    """Weights loaded under inference mode are copied once for a guided step, however many ops and passes use
    them (not once per op), and the gradient with respect to the latent is the one plain autograd gives."""
    with torch.inference_mode():
        weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    with ba.autograd_enabled() as mode:
        z = z.detach().clone().requires_grad_(True)
        out = z
        for _ in range(3):  # three passes through the same weight
            out = torch.tanh(out @ weight) + out @ weight.t()
        (grad,) = torch.autograd.grad(out.square().sum(), z)
        assert len(mode.copies) == 1 and mode.copies[id(weight)][0] is weight
    plain_weight = weight.clone()
    expected_z = z.detach().clone().requires_grad_(True)
    out = expected_z
    for _ in range(3):
        out = torch.tanh(out @ plain_weight) + out @ plain_weight.t()
    (expected,) = torch.autograd.grad(out.square().sum(), expected_z)
    torch.testing.assert_close(grad, expected)
