"""The attention recorder on random tensors through the router: no ComfyUI needed."""

import copy

import pytest
import torch
from attention_lab.attention_patches import (
    AttentionRouter,
    AttentionTechnique,
    sdpa_attention,
    split_heads,
)
from attention_lab.attention_patches.backend import attention_probabilities
from attention_lab.attention_patches.recorder import (
    CROSS,
    SELF,
    AttentionRecorder,
    RecordSelection,
    halved_grid,
    record_bytes,
)

HEADS, DIM = 2, 8
LAYERS = [("input", 1, 0), ("middle", 0, 0), ("output", 3, 0), ("output", 4, 0)]
SCHEDULE = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])  # 4 steps


def options(batch, hw=(4, 4), cond_or_uncond=(1, 0), step=0):
    return {"n_heads": HEADS, "dim_head": DIM, "activations_shape": [batch, 16, *hw],
            "cond_or_uncond": list(cond_or_uncond), "original_shape": [batch, 4, 8, 8],
            "sigmas": torch.full((batch,), float(SCHEDULE[step])), "sample_sigmas": SCHEDULE}


def tensors(batch, queries=16, keys=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = keys or queries
    return (torch.randn(batch, queries, HEADS * DIM, generator=g), torch.randn(batch, keys, HEADS * DIM, generator=g),
            torch.randn(batch, keys, HEADS * DIM, generator=g))


def reference_probabilities(q, k, mask=None):
    """softmax(QKᵀ/√d + mask) per head in float64, averaged over heads: [B, Nq, Nk]."""
    q, k = split_heads(q, HEADS).double(), split_heads(k, HEADS).double()
    logits = q @ k.transpose(-1, -2) / DIM ** 0.5
    if mask is not None:
        logits = logits + mask.double()
    return logits.softmax(-1).mean(1)


def routed(recorder, layer=("output", 3, 0), is_self=True):
    router = AttentionRouter(LAYERS, attention=sdpa_attention)
    router.add(recorder)
    return router.patch_for(layer, is_self)


def test_probabilities_match_the_equation_with_a_mask():
    q, k, _ = tensors(2)
    mask = torch.zeros(2, 16, 16)
    mask[:, :, :5] = torch.finfo(torch.float32).min
    got = attention_probabilities(q, k, HEADS, mask[:, None]).mean(1)
    assert torch.allclose(got.double(), reference_probabilities(q, k, mask[:, None]), atol=1e-6)
    assert got[..., :5].abs().max() == 0 and torch.allclose(got.sum(-1), torch.ones(2, 16))


def test_probabilities_take_every_mask_layout_and_carry_the_gradient():
    q, k, _ = tensors(2)
    q = q.clone().requires_grad_(True)
    mask = torch.randn(2, 16, 16)
    per_head = attention_probabilities(q, k, HEADS, mask)  # [B, Nq, Nk]: the same mask for every head
    assert per_head.shape == (2, HEADS, 16, 16)
    assert torch.equal(per_head, attention_probabilities(q, k, HEADS, mask[:, None]))
    assert torch.equal(attention_probabilities(q, k, HEADS, mask[0])[0], per_head[0])  # [Nq, Nk]: every row
    assert torch.allclose(per_head.mean(1).double(), reference_probabilities(q.detach(), k, mask[:, None]), atol=1e-6)
    (grad,) = torch.autograd.grad(per_head[..., 0].sum(), q)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("layout", [(1, 0), (0, 1), (0,), (1, 0, 0)], ids=["uncond-cond", "cond-uncond", "cfg1", "two-conds"])
def test_records_the_conditional_rows_per_image_and_returns_the_chain_output(layout):
    images = 2
    batch = images * len(layout)
    q, k, v = tensors(batch)
    recorder = AttentionRecorder()
    out = routed(recorder)(q, k, v, options(batch, cond_or_uncond=layout))
    assert torch.equal(out, sdpa_attention(q, k, v, HEADS))  # the backend's own output, bit for bit
    cond_chunks = [c for c, kind in enumerate(layout) if kind == 0]
    expected = torch.stack([
        sum(reference_probabilities(q[c * images + i: c * images + i + 1], k[c * images + i: c * images + i + 1])[0]
            for c in cond_chunks) / len(cond_chunks)
        for i in range(images)
    ])
    assert recorder.grids(SELF) == [(4, 4)] and recorder.grids(CROSS) == []
    assert torch.allclose(recorder.mean(SELF, (4, 4)).double(), expected, atol=1e-6)
    assert recorder.count(SELF, (4, 4)) == len(cond_chunks)
    assert recorder.steps == {0} and recorder.latent_shape == (batch, 4, 8, 8)


def test_unconditional_rows_do_not_reach_the_record():
    q, k, v = tensors(4)
    a, b = AttentionRecorder(), AttentionRecorder()
    routed(a)(q, k, v, options(4))
    q2, k2 = q.clone(), k.clone()
    q2[:2] += 3.0  # the uncond chunk of [uncond, cond]
    k2[:2] -= 1.0
    routed(b)(q2, k2, v, options(4))
    assert torch.equal(a.mean(SELF, (4, 4)), b.mean(SELF, (4, 4)))


def test_running_mean_over_layers_and_steps_and_cross_attention_keys():
    recorder = AttentionRouter(LAYERS, attention=sdpa_attention)
    rec = recorder.add(AttentionRecorder())
    expected = []
    for step, layer in [(0, ("input", 1, 0)), (1, ("output", 3, 0)), (3, ("output", 4, 0))]:
        q, k, v = tensors(2, keys=7, seed=step)
        recorder.patch_for(layer, False)(q, k, v, options(2, step=step))
        expected.append(reference_probabilities(q[1:], k[1:]))
    assert rec.count(CROSS, (4, 4)) == 3 and rec.steps == {0, 1, 3}
    assert torch.allclose(rec.mean(CROSS, (4, 4)).double(), sum(expected) / 3, atol=1e-6)
    assert rec.mean(CROSS, (4, 4)).shape == (1, 16, 7)


def test_query_chunks_give_the_same_record_as_one_pass():
    q, k, v = tensors(2, queries=16, keys=16)
    mask = torch.randn(2, 1, 16, 16)
    whole, chunked = AttentionRecorder(), AttentionRecorder(chunk_elements=2 * HEADS * 16 * 3)  # 3 queries at a time
    routed(whole)(q, k, v, options(2), mask=mask)
    routed(chunked)(q, k, v, options(2), mask=mask)
    assert torch.allclose(whole.mean(SELF, (4, 4)), chunked.mean(SELF, (4, 4)), atol=1e-6)
    assert torch.allclose(whole.mean(SELF, (4, 4)).double(), reference_probabilities(q[1:], k[1:], mask[1:]), atol=1e-6)


class CloseKeys(AttentionTechnique):
    """An outer technique that masks the first keys, as Bounded Attention would."""

    order = 50

    def __call__(self, q, k, v, call, attend, mask=None):
        closed = torch.zeros(q.shape[0], q.shape[1], k.shape[1])
        closed[..., :4] = torch.finfo(q.dtype).min
        return attend(q, k, v, closed)


def test_recorder_runs_innermost_and_sees_the_masks_of_other_techniques():
    router = AttentionRouter(LAYERS, attention=sdpa_attention)
    recorder = AttentionRecorder()
    router.add(recorder)
    router.add(CloseKeys())  # registered later, still outside the recorder
    assert router.techniques[-1] is recorder
    q, k, v = tensors(2)
    router.patch_for(("output", 3, 0), True)(q, k, v, options(2))
    assert recorder.mean(SELF, (4, 4))[..., :4].abs().max() == 0


class Spy(AttentionRecorder):
    def __init__(self, selection):
        super().__init__(selection)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize("selection,layer,is_self,hw,step", [
    (RecordSelection(), ("middle", 0, 0), True, (4, 4), 0),  # middle block: not in the default blocks
    (RecordSelection(max_tokens=8), ("output", 3, 0), True, (4, 4), 0),  # 16 tokens > 8
    (RecordSelection(kinds=frozenset({CROSS})), ("output", 3, 0), True, (4, 4), 0),
    (RecordSelection(start=0.5), ("output", 3, 0), True, (4, 4), 1),  # progress 0.25
    (RecordSelection(end=0.5), ("output", 3, 0), True, (4, 4), 3),  # progress 0.75
    (RecordSelection(layers=frozenset({("output", 4, 0)})), ("output", 3, 0), True, (4, 4), 0),
], ids=["middle", "too-large", "kind", "before-start", "after-end", "other-layer"])
def test_calls_it_does_not_want_never_reach_it(selection, layer, is_self, hw, step):
    spy = Spy(selection)
    q, k, v = tensors(2)
    routed(spy, layer, is_self)(q, k, v, options(2, hw=hw, step=step))
    assert spy.calls == 0 and spy.is_empty


def test_selection_picks_explicit_layers_and_step_ranges():
    spy = Spy(RecordSelection(layers=frozenset({("middle", 0, 0)}), start=0.25, end=0.5))
    router = AttentionRouter(LAYERS, attention=sdpa_attention)
    router.add(spy)
    for step in range(4):
        for layer in LAYERS:
            router.patch_for(layer, True)(*tensors(2), options(2, step=step))
    assert spy.calls == 2 and spy.steps == {1, 2} and spy.count(SELF, (4, 4)) == 2


def test_bad_selection_is_named():
    with pytest.raises(ValueError, match="kinds"):
        RecordSelection(kinds=frozenset({"both"}))
    with pytest.raises(ValueError, match="start"):
        RecordSelection(start=0.8, end=0.2)


def test_run_lifecycle_result_and_clones():
    recorder = AttentionRecorder()
    assert copy.deepcopy(recorder) is recorder  # clones of a MODEL share it
    routed(recorder)(*tensors(2), options(2))
    assert not recorder.is_empty and recorder.result is None
    result = torch.randn(1, 4, 8, 8)
    recorder.finish_run(result)
    assert recorder.runs == 1 and recorder.belongs_to(result.clone())
    assert not recorder.belongs_to(result + 1e-3) and not recorder.belongs_to(result[:, :2])
    recorder.begin_run()
    assert recorder.is_empty and recorder.result is None and recorder.steps == set()
    assert not recorder.belongs_to(result)


def test_a_record_holds_one_batch_shape():
    recorder = AttentionRecorder()
    routed(recorder)(*tensors(2), options(2))
    with pytest.raises(ValueError, match="one sampling run"):
        routed(recorder)(*tensors(4), options(4))


def test_reading_errors_and_closest_grid():
    recorder = AttentionRecorder(RecordSelection(max_tokens=None))
    router = AttentionRouter(LAYERS, attention=sdpa_attention)
    router.add(recorder)
    for hw in [(8, 8), (4, 4), (2, 2)]:
        n = hw[0] * hw[1]
        router.patch_for(("output", 3, 0), True)(*tensors(2, queries=n), options(2, hw=hw))
    assert recorder.grids(SELF) == [(8, 8), (4, 4), (2, 2)]
    assert recorder.closest_grid(SELF, 32) == (8, 8)
    assert recorder.closest_grid(SELF, 4) == (4, 4)
    assert recorder.closest_grid(SELF, 3) == (4, 4)  # 9 tokens: 16/9 is a smaller ratio than 9/4
    with pytest.raises(ValueError, match="recorded: 8x8, 4x4, 2x2"):
        recorder.mean(SELF, (16, 16))
    with pytest.raises(ValueError, match="no cross-attention"):
        recorder.closest_grid(CROSS, 16)


# SD1.5's attention layers and how many times the latent was halved before each
SD15_HALVINGS = {
    **{("input", i, 0): h for i, h in [(1, 0), (2, 0), (4, 1), (5, 1), (7, 2), (8, 2)]},
    ("middle", 0, 0): 3,
    **{("output", i, 0): h for i, h in [(3, 2), (4, 2), (5, 2), (6, 1), (7, 1), (8, 1), (9, 0), (10, 0), (11, 0)]},
}


def test_record_size_is_known_before_sampling():
    # SD1.5 at 2048 px (a 256² latent) with max_resolution 256: the 256x256 self-attention map alone is
    # 65536² float32 = 16 GiB per image, the out-of-memory a run hit after minutes
    total, maps = record_bytes(RecordSelection(max_tokens=256 * 256), SD15_HALVINGS, (256, 256), images=1)
    assert maps[(SELF, (256, 256))] == 65536 ** 2 * 4 == 16 * 2**30
    assert maps[(CROSS, (256, 256))] == 65536 * 77 * 4
    assert total == sum(maps.values()) + 2**26 * 4  # plus one chunk of probabilities
    # the paper's 32² at 512 px: the 32² and 16² maps of the encoder and decoder, tens of MiB
    total, maps = record_bytes(RecordSelection(), SD15_HALVINGS, (64, 64), images=2)
    assert sorted(maps) == [(CROSS, (16, 16)), (CROSS, (32, 32)), (SELF, (16, 16)), (SELF, (32, 32))]
    assert maps[(SELF, (32, 32))] == 2 * 1024 ** 2 * 4 and total < 32 * 2**20
    assert halved_grid((17, 9), 2) == (5, 3)  # stride-2 convolutions round up


def test_segments_are_labelled_one_level_below_unless_that_level_is_too_coarse():
    recorder = AttentionRecorder(RecordSelection(max_tokens=None))
    router = AttentionRouter(LAYERS, attention=sdpa_attention)
    router.add(recorder)
    for hw in [(32, 32), (16, 16), (8, 8), (4, 4)]:
        n = hw[0] * hw[1]
        for is_self, keys in ((True, n), (False, 77)):
            router.patch_for(("output", 3, 0), is_self)(*tensors(1, queries=n, keys=keys), options(1, hw=hw, cond_or_uncond=(0,)))
    assert recorder.largest_grid(SELF) == (32, 32)
    assert recorder.label_grid((32, 32)) == (16, 16)  # the paper: 16² cross-attention under 32² clusters
    assert recorder.label_grid((16, 16)) == (8, 8)
    assert recorder.label_grid((8, 8)) == (8, 8)  # 4² would put a quarter-image object in one or two cells
