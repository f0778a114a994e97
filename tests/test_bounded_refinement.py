"""Bounded Attention's mask refinement on planted attention: no ComfyUI needed."""

import pytest
import torch
from attention_reference import softmax_attention

from attention_lab.attention_patches import AttentionRouter
from attention_lab.attention_patches import bounded as ba

# 8x8 grid. Subject 0's box is the left half's rows 1-6, subject 1's the right half's;
# the subjects themselves are smaller shapes inside their boxes.
H = W = 8
BOXES = ((0.0, 0.125, 0.5, 0.875), (0.5, 0.125, 1.0, 0.875))
# "a red cube and a blue ball": SOT, a, red, cube, and, a, blue, ball, EOS
LAYOUT = ba.BoundedLayout(boxes=BOXES, subject_tokens=((2, 3), (6, 7)), eos_token=8, filter_tokens=(1, 4, 5))
GRID = torch.zeros(H, W, dtype=torch.long)
GRID[:, 4:] = 1  # background in four quarters: 0..3
GRID[4:, :] += 2
GRID[2:5, 1:3] = 4  # subject 0: 3x2 cells in box 0
GRID[3:6, 5:8] = 5  # subject 1: 3x3 cells in box 1
GROUPS = GRID.flatten()
REGIONS = torch.stack([GROUPS == 4, GROUPS == 5])


def planted_self_attention(seed=0):
    """Each cell attends evenly to the cells of its group (a subject or a background quarter), plus noise."""
    g = torch.Generator().manual_seed(seed)
    same = (GROUPS[:, None] == GROUPS[None, :]).float()
    attention = same / same.sum(-1, keepdim=True) + 0.002 * torch.rand(H * W, H * W, generator=g)
    return attention / attention.sum(-1, keepdim=True)


def test_clusters_on_the_subjects_are_assigned_to_their_subjects():
    cross = REGIONS.float() * 0.3 + 0.01  # each subject's leading token attends to the subject
    cross[0, GROUPS == 0] += 0.02  # a little leakage into a background quarter
    boxes = ba.box_masks(BOXES, H, W)
    masks = ba.refined_subject_masks(planted_self_attention(), cross, boxes, boxes, (H, W), clusters=6)
    assert torch.equal(masks, REGIONS)  # the shapes, not the boxes
    assert not torch.equal(masks, boxes)


def test_a_subject_without_a_qualifying_cluster_falls_back_to_its_box():
    cross = torch.zeros(2, H * W)
    cross[0, REGIONS[0]] = 1.0
    cross[1, REGIONS[0]] = 1.0  # subject 1 only attends to subject 0's shape, outside its own box
    boxes = ba.box_masks(BOXES, H, W)
    masks = ba.refined_subject_masks(planted_self_attention(), cross, boxes, boxes, (H, W), clusters=6)
    assert torch.equal(masks[0], REGIONS[0])
    assert torch.equal(masks[1], boxes[1])


def test_assignment_scores_and_threshold():
    # 4 cells, 2 clusters: {0, 1} and {2, 3}
    labels = torch.tensor([0, 0, 1, 1])
    cross = torch.tensor([[1.0, 1.0, 0.0, 0.0],  # subject 0 covers cluster 0 fully: score 2 / min(2, 2) = 1
                          [0.0, 0.3, 0.1, 0.0]])  # subject 1: cluster 0 0.3/min(0.4, 2) = 0.75, cluster 1 0.1/0.4 = 0.25
    assert ba.assign_clusters(labels, cross, threshold=0.2).tolist() == [[True, True, False, False],
                                                                         [False, False, True, True]]
    # above the threshold cluster 1 is background
    assert ba.assign_clusters(labels, cross, threshold=0.3).tolist() == [[True, True, False, False],
                                                                         [False, False, False, False]]


def test_fallback_takes_the_box_away_from_the_other_subjects():
    boxes = torch.tensor([[True, True, False, False], [False, True, True, False]])
    masks = torch.tensor([[True, True, True, False], [False, False, False, False]])
    assert ba.fall_back_to_boxes(masks, boxes).tolist() == [[True, False, False, False], [False, True, True, False]]


def test_cross_masks_are_confined_to_the_regions_in_use():
    cross = torch.tensor([[0.0, 0.1, 1.0, 0.5]])
    soft = ba.subject_cross_masks(cross, torch.tensor([[True, True, True, False]]))
    expected = torch.sigmoid(10 * (cross / (1.0 + 1e-5) - 0.2))
    expected = (expected - expected.min()) / (expected.max() - expected.min() + 1e-5)
    assert torch.allclose(soft, expected * torch.tensor([1.0, 1.0, 1.0, 0.0]))


def test_rebuild_steps_follow_the_authors_schedule():
    config = ba.RefinementConfig()
    assert config.last_rebuild_step(50) == 45 and config.last_rebuild_step(16) == 15
    assert config.last_rebuild_step(15) is None
    assert ba.RefinementConfig(start_step=17).last_rebuild_step(19) == 17
    with pytest.raises(ValueError, match="clusters_per_subject"):
        ba.RefinementConfig(clusters_per_subject=0)


# -- the technique on the router, with planted queries and keys -------------------------------

HEADS, DIM = 1, 8
LAYER = ("output", 3, 0)
START, EVERY, STEPS = 2, 2, 5


def planted_qkv():
    """Queries/keys whose self-attention follows GROUPS and whose cross-attention puts each
    subject's leading token on the subject's cells."""
    q = torch.zeros(1, H * W, DIM)
    q[0, torch.arange(H * W), GROUPS] = 4.0  # one feature per group: self-attention stays in the group
    q[0, REGIONS[0], 6] = 4.0
    q[0, REGIONS[1], 7] = 4.0
    context = torch.zeros(1, 77, DIM)
    context[0, LAYOUT.leading_tokens[0], 6] = 4.0
    context[0, LAYOUT.leading_tokens[1], 7] = 4.0
    return q, context


def step_options(step):
    schedule = torch.linspace(10.0, 0.0, STEPS + 1)
    return {"n_heads": HEADS, "dim_head": DIM, "activations_shape": [1, DIM, H, W], "cond_or_uncond": [0],
            "sigmas": schedule[step:step + 1], "sample_sigmas": schedule}


def refining_router():
    router = AttentionRouter([("middle", 0, 0), LAYER])
    config = ba.RefinementConfig(start_step=START, every=EVERY)
    probe = ba.GuidanceProbe(LAYOUT, {("middle", 0, 0)}, ba.GuidanceConfig())  # its loss layer is not LAYER
    refinement = ba.MaskRefinement(LAYOUT, {LAYER}, config, guidance=probe)
    router.add(ba.BoundedAttention(LAYOUT, guidance=probe, refinement=refinement))
    router.add(probe)
    router.add(refinement)
    return router, probe, refinement


def run_steps(router, steps):
    q, context = planted_qkv()
    outputs = []
    for step in steps:
        out = router.patch_for(LAYER, True)(q, q, q, step_options(step))
        router.patch_for(LAYER, False)(q, context, context, step_options(step))
        outputs.append(out)
    return outputs


def test_technique_refines_from_the_start_step_and_masks_with_the_refined_regions():
    router, _, refinement = refining_router()
    q, _ = planted_qkv()
    boxes = ba.box_masks(BOXES, H, W)
    outputs = run_steps(router, range(START))
    assert refinement.refined is None and refinement.steps == {0, 1}
    box_mask = ba.additive(ba.self_attention_allowed(boxes), torch.float32)
    assert torch.allclose(outputs[-1].double(), softmax_attention(q, q, q, HEADS, box_mask), atol=1e-5)

    outputs = run_steps(router, range(START, STEPS))
    assert refinement.refinements == [2, 4]  # start_step, then every `every` steps
    assert refinement.steps == {0, 1, 2, 3}  # nothing after the last rebuild
    assert torch.equal(refinement.refined, REGIONS[None])
    refined_mask = ba.additive(ba.self_attention_allowed(REGIONS), torch.float32)
    assert not torch.equal(refined_mask, box_mask)
    assert torch.allclose(outputs[-1].double(), softmax_attention(q, q, q, HEADS, refined_mask), atol=1e-5)

    refinement.begin_run()  # the next sampling run starts from the boxes with an empty record
    assert refinement.refined is None and refinement.is_empty and refinement.refinements == []
    outputs = run_steps(router, [START])  # and masks with the boxes again
    assert torch.allclose(outputs[-1].double(), softmax_attention(q, q, q, HEADS, box_mask), atol=1e-5)


def test_guidance_passes_are_not_recorded():
    router, probe, refinement = refining_router()
    with probe.guide_pass(router.ordinal):
        run_steps(router, [0])
    assert refinement.is_empty
    run_steps(router, [0])
    assert not refinement.is_empty


def test_refined_masks_per_image_address_every_chunk():
    refinement = ba.MaskRefinement(LAYOUT, {LAYER})
    technique = ba.BoundedAttention(LAYOUT, refinement=refinement)
    boxes = ba.box_masks(BOXES, H, W)
    refinement.refined, refinement.refined_grid = torch.stack([REGIONS, boxes]), (H, W)  # image 0 refined, image 1 boxes
    refinement.revision += 1
    router = AttentionRouter([LAYER])
    call = router.describe(router.patch_for(LAYER, True), torch.zeros(4, H * W, DIM),
                           dict(step_options(3), cond_or_uncond=[1, 0]))
    self_mask = technique.mask_for(call, H * W, torch.float32, "cpu")
    expected = [ba.additive(ba.self_attention_allowed(r), torch.float32) for r in (REGIONS, boxes)]
    assert self_mask.shape == (4, 1, H * W, H * W)
    for row, image in enumerate([0, 1, 0, 1]):  # rows: uncond images 0, 1, then cond images 0, 1
        assert torch.equal(self_mask[row, 0], expected[image])
    call.is_self = False
    cross = technique.mask_for(call, 77, torch.float32, "cpu")
    assert (cross[:2] == 0).all()  # unconditional rows are not masked
    for image, regions in enumerate((REGIONS, boxes)):
        allowed = ba.cross_attention_allowed(LAYOUT, regions, 77, include_background=False)
        assert torch.equal(cross[2 + image, 0], ba.additive(allowed, torch.float32))
