"""The router inside real ComfyUI sampling, on tiny SD1.5 and SDXL models."""

import sys

import pytest
import torch

from attention_lab.attention_patches import AttentionRouter, AttentionTechnique  # as the core tests import them

STEPS = 3


@pytest.fixture(scope="module")
def patching(host):
    return host.module("nodes.patching")


def test_comfyui_runs_the_very_modules_the_core_tests_import(host, patching, tiny):
    """One copy of the pack: what ComfyUI's executor runs is what `import attention_lab...` gives."""
    import attention_lab.nodes.segment

    assert host.nodes.NODE_CLASS_MAPPINGS["SelfAttnSegment"] is attention_lab.nodes.segment.SelfAttnSegment
    assert host.pack.nodes is sys.modules["attention_lab.nodes"]  # ComfyUI's own `from .nodes import ...`
    assert patching is attention_lab.nodes.patching
    router = patching.attach_router(tiny.sd15_unet(seed=0).clone())
    assert isinstance(router, AttentionRouter) and type(router) is AttentionRouter


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, tiny):
    model = {"sd15": tiny.sd15_unet, "sdxl": tiny.sdxl_unet}[request.param](seed=3)
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(1, 77, tiny.TEXT_HIDDEN, generator=g)
    extra = {"pooled_output": torch.randn(1, tiny.SDXL_POOLED, generator=g), "width": 128, "height": 128} if request.param == "sdxl" else {}
    positive = [[cond, dict(extra)]]
    negative = [[torch.zeros_like(cond), dict(extra, pooled_output=torch.zeros_like(extra["pooled_output"])) if extra else {}]]
    return request.param, model, positive, negative


def sample(model, positive, negative, cfg=5.0, batch=2, sampler="euler"):
    import comfy.sample

    noise = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    return comfy.sample.sample(model, noise, STEPS, cfg, sampler, "normal", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def separate_calls(model):
    """Force cond and uncond into separate UNet calls, as ComfyUI does under memory pressure."""
    m = model.clone()
    m.add_object_patch("memory_required", lambda *args, **kwargs: 1e30)
    return m


class CountCalls:
    """A technique that changes nothing and records how it was called."""

    def __init__(self, base):
        self.base = base
        self.calls = []

    def make(self):
        calls = self.calls

        class Count(self.base):
            def __call__(self, q, k, v, call, attend, mask=None):
                calls.append(call)
                return attend(q, k, v, mask)

        return Count()


@pytest.mark.parametrize("cfg,split", [(5.0, False), (1.0, False), (5.0, True)], ids=["cfg5", "cfg1", "split"])
def test_identity_with_router_on(family, patching, cfg, split):
    name, model, positive, negative = family
    base = separate_calls(model) if split else model
    reference = sample(base, positive, negative, cfg)

    routed = base.clone()
    router = patching.attach_router(routed)
    counter = CountCalls(AttentionTechnique)
    technique = router.add(counter.make())
    out = sample(routed, positive, negative, cfg)

    assert (out - reference).abs().max() <= 1e-6
    layers = len(router.layers)
    assert layers == {"sd15": 16, "sdxl": 70}[name]
    # every layer, self and cross, every model call
    calls_per_forward = 2 * layers
    chunks = 1 if cfg == 1.0 else 2
    forwards = STEPS * (chunks if split else 1)
    assert len(counter.calls) == calls_per_forward * forwards
    layouts = {c.layout.cond_or_uncond for c in counter.calls}
    expected = {(0,)} if cfg == 1.0 else ({(0,), (1,)} if split else {(1, 0)})
    assert layouts == expected
    assert {c.step for c in counter.calls} == set(range(STEPS)) and {c.total_steps for c in counter.calls} == {STEPS}
    router.remove(technique)


def test_call_context_matches_the_unet(family, patching):
    name, model, positive, negative = family
    routed = model.clone()
    router = patching.attach_router(routed)
    counter = CountCalls(AttentionTechnique)
    router.add(counter.make())
    sample(routed, positive, negative, batch=3)
    first_forward = counter.calls[: 2 * len(router.layers)]
    assert [c.ordinal for c in first_forward if c.is_self] == list(range(len(router.layers)))
    for c in first_forward:
        assert c.height * c.width == c.tokens and c.layout.images == 3
        assert c.heads * c.dim_head == c.options["n_heads"] * c.options["dim_head"]
    sizes = {c.layer[0]: set() for c in first_forward}
    for c in first_forward:
        sizes[c.layer[0]].add((c.height, c.width))
    assert (16, 16) in sizes["input"] or (8, 8) in sizes["input"]
    assert max(sizes["middle"]) < max(sizes["output"])


def test_non_square_latent_sizes(tiny, patching):
    import comfy.sample

    model = tiny.sd15_unet(seed=1)
    routed = model.clone()
    router = patching.attach_router(routed)
    counter = CountCalls(AttentionTechnique)
    router.add(counter.make())
    cond = torch.randn(1, 77, tiny.TEXT_HIDDEN)
    noise = torch.randn(1, 4, 12, 20)
    comfy.sample.sample(routed, noise, 1, 1.0, "euler", "normal", [[cond, {}]], [[cond, {}]], torch.zeros_like(noise),
                        seed=0, disable_pbar=True)
    assert {(c.height, c.width) for c in counter.calls} == {(12, 20), (6, 10), (3, 5), (2, 3)}  # ceil halving, middle at 2x3


def test_foreign_patch_before_us_runs_and_later_pack_chains_to_us(family, patching):
    name, model, positive, negative = family
    reference = sample(model, positive, negative)
    seen = {"before": 0, "after": 0}

    def before(q, k, v, extra_options):  # another pack's patch, on ComfyUI's 2-part key, like PAG/SAG
        seen["before"] += 1
        import comfy.ldm.modules.attention as attention

        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    m = model.clone()
    m.set_model_attn1_replace(before, "middle", 0)
    router = patching.attach_router(m)
    counter = CountCalls(AttentionTechnique)
    router.add(counter.make())

    key = ("middle", 0, 0)
    ours = m.model_options["transformer_options"]["patches_replace"]["attn1"][key]

    def after(q, k, v, extra_options):  # a pack patching after us, chaining as it should
        seen["after"] += 1
        return ours(q, k, v, extra_options)

    m.set_model_attn1_replace(after, *key)
    out = sample(m, positive, negative)
    middle_depth = sum(1 for layer in router.layers if layer[:2] == ("middle", 0))
    # the 2-part key covers every transformer of the middle block; "after" only index 0
    assert seen["before"] == middle_depth * seen["after"] and seen["after"] == STEPS
    middle_self = [c for c in counter.calls if c.layer == key and c.is_self]
    assert len(middle_self) == seen["after"]  # our techniques ran once per call
    assert (out - reference).abs().max() <= 1e-5


def test_clone_and_base_model(tiny, patching):
    model = tiny.sd15_unet(seed=2)
    before = repr(model.model_options)
    routed = model.clone()
    router = patching.attach_router(routed)
    assert repr(model.model_options) == before  # the base MODEL never sees our patches
    again = routed.clone()
    clone_router = patching.router_of(again)
    assert clone_router is not router and clone_router.techniques == router.techniques
    assert patching.attach_router(again) is clone_router  # a second node of ours reuses it


def test_unsupported_family_is_named(patching):
    class FakeFlux:
        class model:  # noqa: N801 - mimics ModelPatcher.model
            diffusion_model = torch.nn.Linear(1, 1)

    with pytest.raises(patching.UnsupportedModelError, match="SD1.x, SD2.x and SDXL"):
        patching.unet_layers(FakeFlux(), node="TestNode")
