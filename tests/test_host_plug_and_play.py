"""PlugAndPlay inside real ComfyUI sampling: the demo model (a trained SD1.5-architecture UNet) and a tiny SDXL UNet."""

import math

import pytest
import torch

STEPS = 8
PROMPT = "a green circle on a dotted yellow background"


@pytest.fixture(scope="module")
def pnp(host):
    return host.module("nodes.plug_and_play")


@pytest.fixture(scope="module")
def inv(host):
    return host.module("nodes.inversion")


@pytest.fixture(scope="module")
def demo(demo_model):
    return demo_model


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def invert(inv, model, clip, latent, steps=STEPS, method="ddim"):
    """The authors' inversion: an empty prompt, cfg 1."""
    return inv.invert(model, latent, encode(clip, ""), steps=steps, scheduler="normal", method=method)[1]


@pytest.fixture(scope="module")
def scene(host, demo, inv):
    """A rendered demo-world scene (a red circle on a plain blue background), VAE-encoded and DDIM-inverted."""
    from attention_lab.demo import world

    model, clip, vae = demo
    rendered = world.render(world.random_scene(11, objects=[("red", "circle")], style="plain",
                                              background_color="blue"), 128)
    with torch.inference_mode():
        latent = vae.encode(torch.from_numpy(rendered.image).float()[None] / 255)
        return invert(inv, model, clip, latent)


def separate_calls(model):
    """Force cond and uncond into separate UNet calls, as ComfyUI does under memory pressure."""
    m = model.clone()
    m.add_object_patch("memory_required", lambda *args, **kwargs: 1e30)
    return m


def recording(model, layers):
    """A clone with another pack's attn1 replace patch on `layers`, set before ours: it runs under the router and
    records the queries and keys each call ends with, with the call's layout and σ."""
    import comfy.ldm.modules.attention as attention

    calls = []

    def foreign(q, k, v, extra_options):
        calls.append((extra_options["block"], q.clone(), k.clone(), list(extra_options["cond_or_uncond"]),
                      float(extra_options["sigmas"][0])))
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    patched = model.clone()
    for block, index in layers:
        patched.set_model_attn1_replace(foreign, block, index, 0)
    return patched, calls


def step_of(inversion, sigma):
    return int(torch.argmin((inversion.sampling_sigmas - sigma).abs()))


def test_layers_by_role(pnp, demo, tiny):
    """SD1.5 layout: features of output block 4, attention in output blocks 4-11 (those with attention);
    SDXL: output block 1, attention in 1-5."""
    from attention_lab.attention_patches import plug_and_play as core

    model = demo[0]
    feature, attention = core.decoder_roles(pnp.decoder_levels(model))
    assert feature == 4 and attention == set(range(4, 12))
    assert pnp.feature_path(model, feature) == "diffusion_model.output_blocks.4.0.out_layers"
    feature, attention = core.decoder_roles(pnp.decoder_levels(tiny.sdxl_unet(seed=0)))
    assert feature == 1 and attention == set(range(1, 9))  # 1-5 hold SDXL's decoder attention, 6-8 none


def test_tau_zero_equals_plain_sampling_from_the_inversion_noise(pnp, inv, demo, scene):
    model, clip, _ = demo
    off = pnp.translate(model, clip, scene, [PROMPT], cfg=7.5, steps=STEPS, feature_steps=0.0, attention_steps=0.0)
    plain = inv.replay(model, scene, encode(clip, PROMPT), encode(clip, pnp.NEGATIVE), cfg=7.5)
    # float32 rounding of a batch of 2 rows against 1, carried along 8 steps
    assert (off - plain).abs().max() <= 1e-4 * plain.abs().max()
    on = pnp.translate(model, clip, scene, [PROMPT], cfg=7.5, steps=STEPS)
    assert (on - plain).abs().mean() > 1e-2


@pytest.mark.parametrize("cfg,split", [(7.5, False), (7.5, True), (1.0, False)])
def test_injected_tensors_are_the_guidance_branchs(pnp, demo, scene, monkeypatch, cfg, split):
    """Queries, keys and residual features of the translation rows are bit-equal to the guidance rows' of the same
    UNet call, in the paper's windows only, in every chunk; the guidance rows' latent is the inversion's own."""
    model, clip, _ = demo
    base = separate_calls(model) if split else model
    recorded, calls = recording(base, [("output", 4), ("output", 8), ("input", 1)])
    inputs, features = [], []

    def unet_wrapper(apply, args):
        inputs.append((args["input"].clone(), float(args["timestep"][0])))  # ComfyUI's samplers pass σ
        return apply(args["input"], args["timestep"], **args["c"])

    recorded.set_model_unet_function_wrapper(unet_wrapper)
    original = pnp.apply_plug_and_play

    def apply_and_hook(*args, **kwargs):
        patched, technique = original(*args, **kwargs)
        injector = list(patched.object_patches["diffusion_model.output_blocks.4.0.out_layers"].children())[-1]
        injector.register_forward_hook(lambda module, i, o: features.append((i[0].clone(), o.clone())))
        return patched, technique

    monkeypatch.setattr(pnp, "apply_plug_and_play", apply_and_hook)
    pnp.translate(recorded, clip, scene, [PROMPT], cfg=cfg, steps=STEPS)
    attention_until, feature_until = int(0.5 * STEPS), int(0.8 * STEPS)
    assert calls and len(features) == len(inputs) > 0
    layouts = set()
    for block, q, k, layout, sigma in calls:
        layouts |= set(layout)
        # rows: [guidance, translation] per chunk
        step = step_of(scene, sigma)
        if step == 0 and block[0] == "input":
            continue  # both rows start at the inverted noise: the encoder's first self-attention is the same
        injected = block[0] == "output" and step < attention_until
        assert torch.equal(q[1::2], q[0::2]) == injected and torch.equal(k[1::2], k[0::2]) == injected, (block, step)
    assert layouts == ({0, 1} if cfg > 1 else {0})
    for (before, after), (x, sigma) in zip(features, inputs):
        assert torch.equal(after[0::2], before[0::2])  # the guidance rows' own features
        assert torch.equal(after[1::2], after[0::2]) == (step_of(scene, sigma) < feature_until)
        assert torch.equal(x[0::2], scene.latent_at(sigma).expand_as(x[0::2]))  # on the inversion's trajectory
    assert len({round(s, 6) for _, s in inputs}) == STEPS


def test_sdxl(pnp, inv, demo, tiny):
    """An SDXL UNet (tiny, random weights; the demo CLIP gives a pooled output of its width): inversion, translation,
    and τ = 0 equal to plain sampling from the inversion's noise."""
    _, clip, _ = demo
    model = tiny.sdxl_unet(seed=3)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    inversion = invert(inv, model, clip, latent, steps=4)
    assert inversion.family == "SDXL"
    out = pnp.translate(model, clip, inversion, [PROMPT, "a red square"], cfg=5.0, steps=4)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    off = pnp.translate(model, clip, inversion, [PROMPT], cfg=5.0, steps=4, feature_steps=0.0, attention_steps=0.0)
    plain = inv.replay(model, inversion, encode(clip, PROMPT), encode(clip, pnp.NEGATIVE), cfg=5.0)
    scale = plain.abs().max()
    assert (off - plain).abs().max() <= 1e-4 * scale
    assert (out[:1] - plain).abs().mean() > 1e-4 * scale


def test_composes_with_style_aligned(pnp, host, demo, scene):
    """StyleAligned on the same router (every image shares attention with image 0, the guidance branch): both
    techniques run in one pass and each changes the result."""
    model, clip, _ = demo
    sa = host.module("nodes.style_aligned")
    settings = host.module("attention_patches.style_aligned").StyleAlignedSettings()
    styled = sa.apply_style_aligned(model, settings, share_group_norm=False, reference_control=False)
    patched, _ = pnp.apply_plug_and_play(styled, 2, 0.8, 0.5)
    names = [t.name for t in patched.model_options["transformer_options"]["patches_replace"]["attn1"]
             [("output", 4, 0)].router.techniques]
    assert sorted(names) == ["plug_and_play", "style_aligned"], names
    both = pnp.translate(styled, clip, scene, [PROMPT], steps=STEPS)
    alone = pnp.translate(model, clip, scene, [PROMPT], steps=STEPS)
    off = pnp.translate(styled, clip, scene, [PROMPT], steps=STEPS, feature_steps=0.0, attention_steps=0.0)
    assert torch.isfinite(both).all()
    assert (both - alone).abs().mean() > 1e-3 and (both - off).abs().mean() > 1e-3


def test_errors_before_sampling(pnp, inv, demo, scene, tiny):
    import comfy.model_sampling

    model, clip, _ = demo
    calls = []
    counted = model.clone()
    counted.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"],
                                                                                        args["timestep"], **args["c"]))
    with pytest.raises(ValueError, match="PlugAndPlay: inversion: expected an INVERSION"):
        pnp.translate(counted, clip, "noise", [PROMPT])
    with pytest.raises(ValueError, match=r"PlugAndPlay: steps: 50 steps, but the inversion has 8"):
        pnp.translate(counted, clip, scene, [PROMPT], steps=50)
    with pytest.raises(ValueError, match="PlugAndPlay: inversion: it was inverted with a .* model, this model is SDXL"):
        pnp.translate(tiny.sdxl_unet(seed=0), clip, scene, [PROMPT], steps=STEPS)
    with pytest.raises(ValueError, match="PlugAndPlay: prompts: is empty"):
        pnp.translate(counted, clip, scene, [], steps=STEPS)
    with pytest.raises(ValueError, match="PlugAndPlay: feature_injection: 1.5"):
        pnp.translate(counted, clip, scene, [PROMPT], steps=STEPS, feature_steps=1.5)

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    flow = counted.clone()
    flow.add_object_patch("model_sampling", FlowSampling(model.model.model_config))
    with pytest.raises(ValueError, match="PlugAndPlay: model: .*flow-matching"):
        pnp.translate(flow, clip, scene, [PROMPT], steps=STEPS)
    ddpm = invert(inv, model, clip, model.model.process_latent_out(scene.x_0), steps=STEPS, method="ddpm")
    with pytest.raises(ValueError, match="PlugAndPlay: inversion: a 'ddpm' inversion; .*method 'ddim'"):
        pnp.translate(counted, clip, ddpm, [PROMPT], steps=STEPS)
    with pytest.raises(ValueError, match="PlugAndPlay: positive: expected a CONDITIONING"):
        pnp.translate(counted, clip, scene, [PROMPT], steps=STEPS, positive="a green square")
    assert not calls


def test_a_controlnet_on_positive_reaches_the_guidance_branch_and_every_translation(pnp, demo, scene, tiny):
    """The stand-in ControlNet of the optional `positive` (its text unused) is asked for every conditional row of
    each step, [guidance, translation × 2], and moves every translation; the prompts stay the branches' own."""
    model, clip, _ = demo
    asked = []
    control = tiny.stub_controlnet(asked)
    positive = [[c, dict(extra, control=control)] for c, extra in encode(clip, "a purple star")]
    prompts = [PROMPT, "a red square on a striped green background"]
    plain = pnp.translate(model, clip, scene, prompts, cfg=5.0, steps=STEPS)
    controlled = pnp.translate(model, clip, scene, prompts, cfg=5.0, steps=STEPS, positive=positive)
    assert len(asked) == STEPS and set(asked) == {3}
    for row in range(2):
        assert (controlled[row] - plain[row]).abs().mean() > 1e-2
    assert (controlled[0] - controlled[1]).abs().mean() > 1e-2  # each translation keeps its own prompt


def test_node_schema_has_paper_defaults_and_tooltips(host):
    schema = host.nodes.NODE_CLASS_MAPPINGS["PlugAndPlay"].define_schema()
    defaults = {i.id: getattr(i, "default", None) for i in schema.inputs}
    assert defaults["cfg"] == 7.5 and defaults["steps"] == 50
    assert math.isclose(defaults["feature_injection"], 0.8) and math.isclose(defaults["attention_injection"], 0.5)
    assert defaults["negative_prompt"] == "ugly, blurry, black, low res, unrealistic"
    assert all(getattr(i, "tooltip", None) for i in schema.inputs)


def test_a_weight_patch_on_the_feature_block_still_applies(pnp, inv, demo, scene):
    """LoRA-style weight patches reach the ResBlock whose residual branch the node object-patches (the patched
    branch holds the same modules under the same names)."""
    model, clip, _ = demo
    key = "diffusion_model.output_blocks.4.0.out_layers.3.weight"
    weight = model.get_model_object(key)
    lora = model.clone()
    lora.add_patches({key: (torch.full_like(weight, 0.05),)}, strength_patch=1.0)
    off = pnp.translate(lora, clip, scene, [PROMPT], cfg=7.5, steps=STEPS, feature_steps=0.0, attention_steps=0.0)
    plain = inv.replay(lora, scene, encode(clip, PROMPT), encode(clip, pnp.NEGATIVE), cfg=7.5)
    unpatched = inv.replay(model, scene, encode(clip, PROMPT), encode(clip, pnp.NEGATIVE), cfg=7.5)
    assert (plain - unpatched).abs().mean() > 1e-3  # the weight patch matters
    assert (off - plain).abs().max() <= 1e-4 * plain.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet(pnp, inv, demo, tiny, dtype):
    """A tiny SD1.5 UNet in fp16/bf16: the injection swaps rows in the model's dtype; the result is finite and the
    translation rows still take the guidance rows' features."""
    _, clip, _ = demo
    model = tiny.sd15_unet(seed=3, dtype=dtype)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    inversion = invert(inv, model, clip, latent, steps=4)
    out = pnp.translate(model, clip, inversion, [PROMPT], cfg=5.0, steps=4)
    off = pnp.translate(model, clip, inversion, [PROMPT], cfg=5.0, steps=4, feature_steps=0.0, attention_steps=0.0)
    assert torch.isfinite(out).all() and (out - off).abs().mean() > 0
