"""The attention router on random tensors: no ComfyUI needed."""

import copy

import pytest
import torch
from attention_reference import softmax_attention

from attention_lab.attention_patches import (
    AttentionRouter,
    AttentionTechnique,
    ChunkLayout,
    combine_masks,
    LayerPatch,
    execution_order,
    find_router,
    install,
    sdpa_attention,
)

SD15_LAYERS = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)] + [("output", i, 0) for i in range(3, 12)]
HEADS = 2


def options(batch=2, tokens=64, hw=(8, 8), cond_or_uncond=(1, 0), step_sigma=None, schedule=None, **extra):
    opts = {"n_heads": HEADS, "dim_head": 8, "attn_precision": None, "activations_shape": [batch, 16, *hw],
            "cond_or_uncond": list(cond_or_uncond), "original_shape": [batch, 4, *hw]}
    if step_sigma is not None:
        opts["sigmas"] = torch.full((batch,), step_sigma)
    if schedule is not None:
        opts["sample_sigmas"] = schedule
    opts.update(extra)
    return opts


def qkv(batch=2, tokens=64, kv_tokens=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kv_tokens = kv_tokens or tokens
    return (torch.randn(batch, tokens, HEADS * 8, generator=g).to(dtype),
            torch.randn(batch, kv_tokens, HEADS * 8, generator=g).to(dtype),
            torch.randn(batch, kv_tokens, HEADS * 8, generator=g).to(dtype))


def reference_attention(q, k, v, mask=None):
    return softmax_attention(q, k, v, HEADS, mask)


class Recording(AttentionTechnique):
    """Writes its name into a shared log on the way in and out."""

    def __init__(self, name, log, order=100):
        self.name, self.log, self.order = name, log, order

    def __call__(self, q, k, v, call, attend, mask=None):
        self.log.append(f"{self.name}>")
        out = attend(q, k, v, mask)
        self.log.append(f"<{self.name}")
        return out


class ScaleQuery(AttentionTechnique):
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, q, k, v, call, attend, mask=None):
        return attend(q * self.factor, k, v, mask)


class AddMask(AttentionTechnique):
    def __init__(self, mask):
        self.mask = mask

    def __call__(self, q, k, v, call, attend, mask=None):
        self.seen = mask
        return attend(q, k, v, combine_masks(mask, self.mask))


def test_sdpa_backend_matches_softmax_equation_with_mask_and_precision():
    q, k, v = qkv()
    mask = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(sdpa_attention(q, k, v, HEADS), reference_attention(q, k, v).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v, HEADS, mask=mask), reference_attention(q, k, v, mask).float(), atol=1e-5, rtol=1e-5)
    half = sdpa_attention(*(t.half() for t in (q, k, v)), HEADS, attn_precision=torch.float32)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), reference_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)


def test_no_technique_is_exactly_the_backend():
    router = AttentionRouter(SD15_LAYERS)
    q, k, v = qkv()
    out = router.patch_for(("middle", 0, 0), True)(q, k, v, options())
    assert torch.equal(out, sdpa_attention(q, k, v, HEADS))


def test_techniques_run_in_order_then_registration_order():
    log = []
    router = AttentionRouter(SD15_LAYERS)
    router.add(Recording("late", log, order=200))
    router.add(Recording("a", log))
    router.add(Recording("b", log))
    router.add(Recording("early", log, order=10))
    router.patch_for(("output", 3, 0), True)(*qkv(), options())
    assert log == ["early>", "a>", "b>", "late>", "<late", "<b", "<a", "<early"]


def test_technique_changes_reach_the_backend_and_masks_combine():
    router = AttentionRouter(SD15_LAYERS)
    m1, m2 = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 64)
    router.add(ScaleQuery(0.5))
    outer, inner = router.add(AddMask(m1)), router.add(AddMask(m2))
    q, k, v = qkv()
    out = router.patch_for(("input", 1, 0), True)(q, k, v, options())
    torch.testing.assert_close(out, reference_attention(q * 0.5, k, v, m1 + m2).float(), atol=1e-5, rtol=1e-5)
    assert outer.seen is None and torch.equal(inner.seen, m1)  # inner techniques see the mask so far


def test_wants_filters_per_call():
    class OnlyCross(ScaleQuery):
        def wants(self, call):
            return not call.is_self

    router = AttentionRouter(SD15_LAYERS)
    router.add(OnlyCross(0.0))
    q, k, v = qkv()
    assert torch.equal(router.patch_for(("input", 1, 0), True)(q, k, v, options()), sdpa_attention(q, k, v, HEADS))
    cross = router.patch_for(("input", 1, 0), False)(q, k, v, options())
    torch.testing.assert_close(cross, v.view(2, 64, HEADS, 8).mean(1, keepdim=True).expand(-1, 64, -1, -1).reshape(2, 64, -1))


def test_call_context():
    seen = []

    class Look(AttentionTechnique):
        def __call__(self, q, k, v, call, attend, mask=None):
            seen.append(call)
            return attend(q, k, v, mask)

    router = AttentionRouter(SD15_LAYERS)
    router.add(Look())
    schedule = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    q, k, v = qkv(batch=6, tokens=24, kv_tokens=77)
    opts = options(batch=6, hw=(4, 6), cond_or_uncond=(1, 0, 0), step_sigma=3.0, schedule=schedule)
    router.patch_for(("output", 5, 0), False)(q, k, v, opts)
    call = seen[0]
    assert (call.layer, call.is_self, call.height, call.width, call.heads) == (("output", 5, 0), False, 4, 6, HEADS)
    assert call.ordinal == SD15_LAYERS.index(("output", 5, 0)) and call.num_layers == 16
    assert (call.step, call.total_steps, call.sigma) == (2, 4, 3.0) and call.progress == 0.5
    assert call.layout == ChunkLayout((1, 0, 0), 2)
    assert call.layout.rows(cond=True) == [2, 3, 4, 5] and call.layout.rows(cond=False) == [0, 1]
    assert call.layout.row(call.layout.chunks(cond=True)[1], 1) == 5


def test_layout_outside_sampling_is_one_conditional_chunk():
    assert ChunkLayout.of(3, None) == ChunkLayout((0,), 3)
    with pytest.raises(ValueError, match="does not split"):
        ChunkLayout.of(3, [1, 0])


def test_execution_order():
    shuffled = list(reversed(SD15_LAYERS)) + [("output", 0, 1), ("output", 0, 0), ("input", 4, 1)]
    ordered = execution_order(shuffled)
    assert ordered[0] == ("input", 1, 0) and ordered[-1] == ("output", 11, 0)
    assert ordered.index(("input", 4, 0)) + 1 == ordered.index(("input", 4, 1))
    assert ordered.index(("middle", 0, 0)) < ordered.index(("output", 0, 0)) < ordered.index(("output", 0, 1))


# -- installation, chaining, clones ------------------------------------------------


def model_options():
    return {"transformer_options": {"patches_replace": {}}}


def install_on(opts, layers=SD15_LAYERS):
    def set_patch(patch, kind, layer):
        opts["transformer_options"]["patches_replace"].setdefault(kind, {})[tuple(layer)] = patch

    return install(opts["transformer_options"]["patches_replace"], set_patch, layers)


def test_install_covers_every_layer_once_and_is_found_again():
    opts = model_options()
    router = install_on(opts)
    replace = opts["transformer_options"]["patches_replace"]
    assert set(replace["attn1"]) == set(replace["attn2"]) == set(SD15_LAYERS)
    assert all(isinstance(p, LayerPatch) and p.router is router for p in replace["attn1"].values())
    assert install_on(opts) is router and find_router(replace) is router
    assert replace["attn1"][("middle", 0, 0)].previous is None


def test_foreign_patch_set_before_us_still_runs_after_our_techniques():
    opts = model_options()
    foreign_calls = []

    def foreign(q, k, v, extra_options):  # e.g. PAG, keyed by ComfyUI's 2-part fallback
        foreign_calls.append(q.clone())
        return v

    opts["transformer_options"]["patches_replace"]["attn1"] = {("middle", 0): foreign}
    router = install_on(opts)
    router.add(ScaleQuery(2.0))
    q, k, v = qkv()
    out = opts["transformer_options"]["patches_replace"]["attn1"][("middle", 0, 0)](q, k, v, options())
    assert torch.equal(out, v) and torch.equal(foreign_calls[0], q * 2.0)


def test_pack_set_after_us_can_chain_to_us_and_techniques_run_once():
    opts = model_options()
    router = install_on(opts)
    log = []
    router.add(Recording("ours", log))
    replace = opts["transformer_options"]["patches_replace"]["attn1"]
    ours = replace[("output", 4, 0)]

    def later_pack(q, k, v, extra_options):
        log.append("theirs")
        return ours(q, k, v, extra_options) * 2

    replace[("output", 4, 0)] = later_pack
    q, k, v = qkv()
    out = replace[("output", 4, 0)](q, k, v, options())
    torch.testing.assert_close(out, 2 * sdpa_attention(q, k, v, HEADS))
    assert log == ["theirs", "ours>", "<ours"]

    # Our node applied again (another technique) wraps the foreign patch: the
    # chain is ours -> theirs -> ours, and our techniques still run once.
    assert install_on(opts) is router
    log.clear()
    replace[("output", 4, 0)](q, k, v, options())
    assert log == ["ours>", "theirs", "<ours"]


def test_masked_call_over_foreign_patch_keeps_the_mask(caplog):
    opts = model_options()
    opts["transformer_options"]["patches_replace"]["attn2"] = {("input", 1, 0): lambda q, k, v, o: v}
    router = install_on(opts)
    mask = torch.randn(1, 1, 64, 64)
    router.add(AddMask(mask))
    q, k, v = qkv()
    out = opts["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)](q, k, v, options())
    torch.testing.assert_close(out, reference_attention(q, k, v, mask).float(), atol=1e-5, rtol=1e-5)
    assert "takes no mask" in caplog.text


def test_clone_gets_its_own_router_sharing_technique_objects():
    opts = model_options()
    router = install_on(opts)
    shared = router.add(ScaleQuery(3.0))
    cloned = copy.deepcopy(opts)  # what ModelPatcher.clone() does
    replace = cloned["transformer_options"]["patches_replace"]
    clone_router = find_router(replace)
    assert clone_router is not router
    assert {id(p.router) for kind in ("attn1", "attn2") for p in replace[kind].values()} == {id(clone_router)}
    assert clone_router.techniques == [shared] and clone_router.techniques[0] is shared
    clone_router.add(ScaleQuery(0.0))
    assert router.techniques == [shared]  # the original model is untouched


def test_backend_receives_heads_mask_precision_and_options():
    seen = {}

    def backend(q, k, v, heads, mask=None, attn_precision=None, transformer_options=None):
        seen.update(heads=heads, mask=mask, attn_precision=attn_precision, options=transformer_options)
        return q

    router = AttentionRouter(SD15_LAYERS, attention=backend)
    mask = torch.zeros(1, 1, 64, 64)
    router.add(AddMask(mask))
    opts = options(attn_precision=torch.float32, optimized_attention_override="kept")
    router.patch_for(("input", 1, 0), True)(*qkv(), opts)
    assert seen["heads"] == HEADS and seen["attn_precision"] is torch.float32
    assert torch.equal(seen["mask"], mask)
    # ComfyUI's backends read optimized_attention_override from the options they get
    assert seen["options"] is opts
