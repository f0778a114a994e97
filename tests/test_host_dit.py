"""The router on Flux and SD3 inside real ComfyUI sampling, on tiny random-weight DiTs (tests/tiny_dit.py)."""


import pytest
import torch

STEPS = 3


@pytest.fixture(scope="module")
def patching(host):
    return host.module("nodes.patching")


@pytest.fixture(scope="module")
def dit(host):
    return host.module("attention_patches.dit")


MODELS = ["flux", "flux_schnell", "sd3"]


@pytest.fixture(scope="module", params=MODELS)
def family(request, tiny_dit):
    name = request.param
    if name == "sd3":
        model = tiny_dit.sd3_model(seed=3)
    else:
        model = tiny_dit.flux_model(seed=3, guidance_embed=name == "flux")
    positive, negative = tiny_dit.conds(seed=5, flux=name != "sd3")
    return name, model, positive, negative


def sample(model, positive, negative, cfg=3.0, batch=2, height=16, width=16):
    import comfy.sample

    noise = torch.randn(batch, 16, height, width, generator=torch.Generator().manual_seed(11))
    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def counting(base, families=frozenset({"flux", "sd3"})):
    calls = []

    class Count(base):
        def __call__(self, q, k, v, call, attend, mask=None):
            assert q.shape == k.shape == v.shape and q.ndim == 3  # [B, N, heads·dim] whatever the family's layout
            calls.append((call, tuple(q.shape), tuple(k.shape)))
            return attend(q, k, v, mask)

    Count.families = families
    return Count(), calls


class ForeignOverride:
    """Another pack's optimized_attention_override (e.g. a Sage/Flash attention patch) that chains as it should."""

    def __init__(self, previous=None):
        self.previous = previous
        self.calls = 0

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def expected_layers(name):
    return {"flux": 6, "flux_schnell": 6, "sd3": 5}[name]  # tiny_dit: 2 + 4 Flux blocks; 3 SD3 blocks + 2 image self-attentions


@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["cfg1", "cfg3"])
def test_identity_with_router_on(family, patching, host, cfg):
    name, model, positive, negative = family
    reference = sample(model, positive, negative, cfg)
    routed = model.clone()
    router = patching.attach_router(routed, families=("flux", "sd3"))
    technique, calls = counting(host.module("attention_patches").AttentionTechnique)
    router.add(technique)
    out = sample(routed, positive, negative, cfg)

    assert (out - reference).abs().max() <= 1e-6
    assert router.family == ("sd3" if name == "sd3" else "flux")
    assert len(router.layers) == expected_layers(name)
    assert len(calls) == len(router.layers) * STEPS  # one batched call per step: every attention once
    layouts = {c.layout.cond_or_uncond for c, _, _ in calls}
    # cfg 1 (how guidance-distilled Flux runs) has no uncond chunk
    assert layouts == ({(0,)} if cfg == 1.0 else {(1, 0)})
    assert {c.step for c, _, _ in calls} == set(range(STEPS)) and {c.total_steps for c, _, _ in calls} == {STEPS}


def test_call_context_on_the_joint_layout(family, patching, host, tiny_dit):
    name, model, positive, negative = family
    routed = model.clone()
    router = patching.attach_router(routed, families=("flux", "sd3"))
    technique, calls = counting(host.module("attention_patches").AttentionTechnique)
    router.add(technique)
    sample(routed, positive, negative, cfg=3.0, batch=3, height=12, width=20)
    first = calls[: len(router.layers)]
    assert [c.ordinal for c, _, _ in first] == list(range(len(router.layers)))
    text = positive[0][0].shape[1]
    for c, q_shape, _ in first:
        assert (c.height, c.width) == (6, 10)  # the latent / patch size 2
        assert c.layout.images == 3 and q_shape[0] == 6
        assert c.family == router.family and c.is_self
        if c.joint:
            assert c.text_tokens == text and q_shape[1] == text + 60 and c.image_tokens == slice(text, text + 60)
        else:  # SD3.5's image-only self-attention of a joint block
            assert name == "sd3" and c.layer[2] == 1 and c.text_tokens == 0 and q_shape[1] == 60
        assert q_shape[2] == c.heads * c.dim_head
    kinds = [c.layer[0] for c, _, _ in first]
    if name != "sd3":
        assert kinds == ["double_block"] * 2 + ["single_block"] * 4


def test_techniques_change_the_output(family, patching, host):
    """The override really is on the path: a technique that drops the image values changes the result."""
    name, model, positive, negative = family
    reference = sample(model, positive, negative)

    class DropImageValues(host.module("attention_patches").AttentionTechnique):
        families = frozenset({"flux", "sd3"})

        def __call__(self, q, k, v, call, attend, mask=None):
            v = v.clone()
            v[:, call.image_tokens] = 0
            return attend(q, k, v, mask)

    routed = model.clone()
    patching.attach_router(routed, families=("flux", "sd3")).add(DropImageValues())
    out = sample(routed, positive, negative)
    assert (out - reference).abs().max() > 1e-2


def test_foreign_override_before_and_after_us(family, patching, host):
    name, model, positive, negative = family
    reference = sample(model, positive, negative)

    m = model.clone()
    before = ForeignOverride()
    m.model_options["transformer_options"]["optimized_attention_override"] = before
    router = patching.attach_router(m, families=("flux", "sd3"))
    technique, calls = counting(host.module("attention_patches").AttentionTechnique)
    router.add(technique)
    ours = m.model_options["transformer_options"]["optimized_attention_override"]
    assert ours is not before and ours.previous is before  # chained, not replaced

    after = ForeignOverride(previous=ours)
    m.model_options["transformer_options"]["optimized_attention_override"] = after
    assert patching.attach_router(m, families=("flux", "sd3")) is router
    assert m.model_options["transformer_options"]["optimized_attention_override"] is after  # we found ourselves in its chain

    out = sample(m, positive, negative)
    # ComfyUI's override slot is read by every attention of the sampled model (after -> ours -> before -> func)
    per_run = len(router.layers) * STEPS
    assert len(calls) == per_run and after.calls == before.calls == per_run
    assert (out - reference).abs().max() <= 1e-6


def test_foreign_block_patch_before_us_runs(family, patching, host):
    name, model, positive, negative = family
    reference = sample(model, positive, negative)
    seen = []

    def foreign(args, extra):
        running = args["transformer_options"].get("attention_lab.dit_block")
        seen.append((running.kind, running.index))
        return extra["original_block"](args)

    m = model.clone()
    m.set_model_patch_replace(foreign, "dit", "double_block", 0)
    router = patching.attach_router(m, families=("flux", "sd3"))
    technique, calls = counting(host.module("attention_patches").AttentionTechnique)
    router.add(technique)
    out = sample(m, positive, negative)
    assert len(seen) == STEPS and all(s == ("double_block", 0) for s in seen)  # ours ran first, then theirs
    assert len(calls) == len(router.layers) * STEPS
    assert (out - reference).abs().max() <= 1e-6


def test_clones_and_base_model(family, patching):
    name, model, positive, negative = family
    before = repr(model.model_options)
    routed = model.clone()
    router = patching.attach_router(routed, families=("flux", "sd3"))
    assert repr(model.model_options) == before
    again = routed.clone()
    clone_router = patching.router_of(again)
    assert clone_router is not router and clone_router.family == router.family
    override = again.model_options["transformer_options"]["optimized_attention_override"]
    assert override.router is clone_router  # the clone's override serves the clone's router
    assert patching.attach_router(again, families=("flux", "sd3")) is clone_router


def test_unsupported_family_is_named(family, patching, host):
    name, model, positive, negative = family
    shown = "SD3" if name == "sd3" else "Flux"
    with pytest.raises(patching.UnsupportedModelError, match=f"SomeNode: the model is {shown}; SomeNode supports SD1"):
        patching.attach_router(model.clone(), node="SomeNode")
    router = patching.attach_router(model.clone(), families=("flux", "sd3"))
    with pytest.raises(ValueError, match=f"technique: the model is {shown}, and technique supports SD1.x/SD2.x/SDXL UNet"):
        router.add(host.module("attention_patches").AttentionTechnique())


def test_unet_only_nodes_refuse_dits_naming_node_and_family(tiny_dit, host):
    segment = host.module("nodes.segment")
    positive, _ = tiny_dit.conds(seed=1)
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    with pytest.raises(ValueError, match="RecordAttentionPass: the model is Flux.*RecordAttentionPass supports SD1.x"):
        segment.RecordAttentionPass.execute(tiny_dit.flux_model(seed=1), positive, latent, 0.5, 0, 0, False)


def test_an_override_that_cuts_us_off_is_reported(family, patching, host, caplog):
    name, model, positive, negative = family
    m = model.clone()
    router = patching.attach_router(m, families=("flux", "sd3"))
    technique, calls = counting(host.module("attention_patches").AttentionTechnique)
    router.add(technique)
    m.model_options["transformer_options"]["optimized_attention_override"] = ForeignOverride()  # does not chain
    with caplog.at_level("WARNING", logger="attention_lab"):
        sample(m, positive, negative)
    assert not calls
    assert "another node replaced ComfyUI's attention override" in caplog.text
