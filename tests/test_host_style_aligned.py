"""SharedAttentionStyleAlign inside real ComfyUI sampling, on tiny SD1.5 and SDXL models."""

import logging
import math
import re

import pytest
import torch

STEPS = 3
IMAGES = 2


@pytest.fixture(scope="module")
def sa(host):
    return host.module("nodes.style_aligned")


@pytest.fixture(scope="module")
def core(host):
    return host.module("attention_patches.style_aligned")


def conditioning(tiny, family, images, seed=5):
    """One prompt per image (a batch of conditionings), as a style-aligned batch uses."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(images, 77, tiny.TEXT_HIDDEN, generator=g)
    extra = {}
    if family == "sdxl":
        extra = {"pooled_output": torch.randn(images, tiny.SDXL_POOLED, generator=g), "width": 128, "height": 128}
    negative_extra = dict(extra, pooled_output=torch.zeros_like(extra["pooled_output"])) if extra else {}
    return [[cond, extra]], [[torch.zeros_like(cond), negative_extra]]


def first_rows(conds, n):
    return [[c[:n], {k: (v[:n] if torch.is_tensor(v) else v) for k, v in extra.items()}] for c, extra in conds]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, tiny):
    model = {"sd15": tiny.sd15_unet, "sdxl": tiny.sdxl_unet}[request.param](seed=3)
    positive, negative = conditioning(tiny, request.param, IMAGES)
    return request.param, model, positive, negative


NOISE = torch.randn(IMAGES, 4, 16, 16, generator=torch.Generator().manual_seed(11))


def sample(model, positive, negative, images=IMAGES, cfg=5.0, sampler="euler"):
    import comfy.sample

    noise = NOISE[:images]
    return comfy.sample.sample(model, noise, STEPS, cfg, sampler, "normal", first_rows(positive, images),
                               first_rows(negative, images), torch.zeros_like(noise), seed=0, disable_pbar=True)


def relative(a, b):
    """Max abs difference over b's max magnitude (the random tiny models output values in the hundreds)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def separate_calls(model):
    """Force cond and uncond into separate UNet calls, as ComfyUI does under memory pressure."""
    m = model.clone()
    m.add_object_patch("memory_required", lambda *args, **kwargs: 1e30)
    return m


def style_align(sa, core, model, share_group_norm="off", reference_gets_control=False, **attention):
    settings = core.StyleAlignedSettings(attention=core.StyleAlignedOptions(**attention))
    return sa.apply_style_aligned(model, settings, sa.resolve_group_norm(share_group_norm, model), reference_gets_control)


@pytest.fixture(scope="module")
def baseline(family):
    """Unpatched sampling of the batch and of the reference alone (CFG 5)."""
    name, model, positive, negative = family
    return sample(model, positive, negative), sample(model, positive, negative, images=1)


def test_invariants(family, baseline, sa, core):
    name, model, positive, negative = family
    unpatched, alone = baseline
    patched = style_align(sa, core, model)
    out = sample(patched, positive, negative)
    assert torch.isfinite(out).all()
    # shift 0, scale 1, no norm sharing: the reference is what it is alone (up to ComfyUI's
    # own batch-size rounding, which the unpatched batch shows as well)
    assert relative(out[0], alone[0]) <= 1e-4
    assert relative(out[0], unpatched[0]) <= 1e-6
    # every other image takes its style
    assert min(relative(out[i], unpatched[i]) for i in range(1, IMAGES)) > 1e-2
    # a batch of one has nothing to share: exactly unpatched, whatever the settings
    busy = style_align(sa, core, model, share_group_norm="on", shared_score_shift=math.log(2))
    assert torch.equal(sample(busy, positive, negative, images=1), alone)
    # bypassing the node: the model it was applied to samples exactly as before
    assert torch.equal(sample(model, positive, negative), unpatched)


@pytest.mark.parametrize("cfg,split", [(1.0, False), (5.0, True)], ids=["cfg1", "split"])
def test_other_batch_layouts(tiny, sa, core, cfg, split):
    model = tiny.sd15_unet(seed=3)
    positive, negative = conditioning(tiny, "sd15", IMAGES)
    base = separate_calls(model) if split else model
    unpatched = sample(base, positive, negative, cfg=cfg)
    alone = sample(base, positive, negative, images=1, cfg=cfg)
    out = sample(style_align(sa, core, base, shared_score_shift=math.log(2), shared_score_scale=0.5),
                 positive, negative, cfg=cfg)
    # the reference is plain attention whatever the shift and scale
    assert relative(out[0], alone[0]) <= 1e-4
    assert min(relative(out[i], unpatched[i]) for i in range(1, IMAGES)) > 1e-2


def test_shared_group_norm_leaves_base_model_untouched(tiny, sa, core):
    model = tiny.sd15_unet(seed=3)
    positive, negative = conditioning(tiny, "sd15", IMAGES)
    unpatched = sample(model, positive, negative)
    modules = dict(model.model.diffusion_model.named_modules())
    norms = {n: m for n, m in modules.items() if isinstance(m, torch.nn.GroupNorm)}
    weights = {n: (m.weight.clone(), m.bias.clone()) for n, m in norms.items()}
    patched = style_align(sa, core, model, share_group_norm="on")
    assert len(patched.object_patches) == len(norms) > 0 and not model.object_patches
    plain_attention_only = style_align(sa, core, model, share_group_norm="off")
    out = sample(patched, positive, negative)
    assert relative(out[1:], sample(plain_attention_only, positive, negative)[1:]) > 1e-3  # norms shared
    assert torch.equal(sample(model, positive, negative), unpatched)  # bypass restores exactly
    after = dict(model.model.diffusion_model.named_modules())
    for n, m in norms.items():
        assert after[n] is m  # the same module objects, no swapped classes
        assert m.forward.__func__ is type(m).forward  # its own forward again
        assert torch.equal(m.weight, weights[n][0]) and torch.equal(m.bias, weights[n][1])


def test_lora_style_weight_patch_on_group_norm_still_applies(tiny, sa, core):
    """A weight patch (what LoRA does) on a GroupNorm survives the object-patched forward."""
    model = tiny.sd15_unet(seed=4)
    positive, negative = conditioning(tiny, "sd15", IMAGES)
    key = "diffusion_model.middle_block.0.in_layers.0.weight"
    lora = model.clone()
    lora.add_patches({key: (torch.full_like(model.get_model_object(key), 0.5),)}, strength_patch=1.0)
    without = sample(model, positive, negative, images=1)
    with_lora = sample(lora, positive, negative, images=1)
    assert relative(with_lora, without) > 1e-3
    patched = style_align(sa, core, lora, share_group_norm="on")
    assert torch.equal(sample(patched, positive, negative, images=1), with_lora)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(tiny, sa, core, dtype):
    """Finite, and no further from fp32 than the unpatched model's own rounding in that dtype."""
    positive, negative = conditioning(tiny, "sd15", IMAGES)
    full, half = tiny.sd15_unet(seed=3), tiny.sd15_unet(seed=3, dtype=dtype)
    out = sample(style_align(sa, core, half), positive, negative)
    assert torch.isfinite(out).all()
    patched_error = relative(out.float(), sample(style_align(sa, core, full), positive, negative))
    unpatched_error = relative(sample(half, positive, negative).float(), sample(full, positive, negative))
    assert patched_error <= 2 * unpatched_error + 1e-3


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "lcm"])
def test_other_samplers(tiny, sa, core, sampler):
    model = tiny.sd15_unet(seed=3)
    positive, negative = conditioning(tiny, "sd15", IMAGES)
    unpatched = sample(model, positive, negative, sampler=sampler)
    patched = style_align(sa, core, model, share_group_norm="auto")
    out = sample(patched, positive, negative, sampler=sampler)
    assert torch.isfinite(out).all()
    assert relative(out[1:], unpatched[1:]) > 1e-2
    if sampler == "dpmpp_2m":  # deterministic: the reference is what it is alone (norms shared too)
        alone = sample(model, positive, negative, images=1, sampler=sampler)
        assert relative(out[0], alone[0]) <= 1e-4


class ConstantControl:
    """A stand-in ControlNet: a residual on the middle block for every row, like a real one's."""

    def __new__(cls, strength):
        import comfy.controlnet

        class Control(comfy.controlnet.ControlBase):
            def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
                residual = torch.full((x_noisy.shape[0], 1, 1, 1), strength, dtype=x_noisy.dtype)
                return {"input": [], "middle": [residual], "output": []}

            def copy(self):
                return self

            def inference_memory_requirements(self, dtype):
                return 0

        return Control()


def with_control(conds, control):
    return [[c, dict(extra, control=control)] for c, extra in conds]


@pytest.mark.parametrize("reference_gets_control", [False, True])
def test_control_residuals_skip_the_reference(tiny, sa, core, reference_gets_control):
    model = tiny.sd15_unet(seed=3)
    positive, negative = conditioning(tiny, "sd15", IMAGES)
    control = ConstantControl(3.0)
    cpos, cneg = with_control(positive, control), with_control(negative, control)
    alone = sample(model, positive, negative, images=1)  # no control at all
    patched = style_align(sa, core, model, reference_gets_control=reference_gets_control)
    no_control = sample(patched, positive, negative)
    out = sample(patched, cpos, cneg)
    assert relative(out[1:], no_control[1:]) > 1e-3  # the others follow the control
    reference_error = relative(out[0], alone[0])
    if reference_gets_control:
        assert reference_error > 1e-3
    else:
        assert reference_error <= 1e-4


def test_node_schema_and_bad_input(sa, host, tiny):
    schema = sa.SharedAttentionStyleAlign.define_schema()
    assert schema.node_id == "SharedAttentionStyleAlign" and schema.category.startswith("attention_lab/")
    assert all(getattr(i, "tooltip", None) for i in schema.inputs)
    defaults = {i.id: i.default for i in schema.inputs if hasattr(i, "default")}
    assert defaults["shared_score_scale"] == 1.0 and defaults["shared_score_shift"] == 0.0
    assert defaults["adain_queries"] and defaults["adain_keys"] and not defaults["adain_values"]
    assert defaults["only_self_level"] == 0.0 and defaults["reference_index"] == 0
    assert sa.resolve_group_norm("auto", tiny.sdxl_unet(seed=0)) is False
    assert sa.resolve_group_norm("auto", tiny.sd15_unet(seed=0)) is True
    with pytest.raises(ValueError, match="share_with"):
        sa.SharedAttentionStyleAlign.execute(tiny.sd15_unet(seed=0), 0, "1; import os", 1.0, 0.0, True, True,
                                             False, "auto", False, 0.0, "all", 0.0, 1.0, False)


def counting_unet_calls(model):
    """`model` with a UNet function wrapper that counts the UNet calls into `calls`."""
    calls = []

    def unet(apply_model, call):
        calls.append(call["input"].shape[0])
        return apply_model(call["input"], call["timestep"], **call["c"])

    counted = model.clone()
    counted.set_model_unet_function_wrapper(unet)
    return counted, calls


@pytest.mark.parametrize("reference_index,share_with,message", [
    (4, None, "reference_index is 4 but the batch has 2"),
    (0, (1, 5), r"share_with names image\(s\) \[5\] but the batch has 2"),
])
def test_an_index_beyond_the_batch_is_refused_before_the_first_unet_call(tiny, sa, core, reference_index, share_with,
                                                                           message):
    model, calls = counting_unet_calls(tiny.sd15_unet(seed=3))
    positive, negative = conditioning(tiny, "sd15", 2)
    settings = core.StyleAlignedSettings(reference_index=reference_index, share_with=share_with)
    patched = sa.apply_style_aligned(model, settings, False, False)
    with pytest.raises(ValueError, match=f"SharedAttentionStyleAlign: {message}"):
        sample(patched, positive, negative, images=2)
    assert calls == []


def test_sharing_with_the_reference_alone_is_refused_by_the_node(tiny, sa):
    model = tiny.sd15_unet(seed=0)
    for share_with, named in (("0", "only image 0, the reference itself"), ("[2]", "only image 2"), ("[]", "no image")):
        reference = 2 if share_with == "[2]" else 0
        with pytest.raises(ValueError, match=rf"share_with names {re.escape(named)}"):
            sa.SharedAttentionStyleAlign.execute(model, reference, share_with, 1.0, 0.0, True, True, False, "auto",
                                                 False, 0.0, "all", 0.0, 1.0, False)


def test_a_batch_of_one_is_reported(tiny, sa, core, caplog):
    model = tiny.sd15_unet(seed=3)
    positive, negative = conditioning(tiny, "sd15", 1)
    patched = style_align(sa, core, model)
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        out = sample(patched, positive, negative, images=1)
    assert torch.equal(out, sample(model, positive, negative, images=1))
    assert "SharedAttentionStyleAlign: the latent batch has 1 image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        sample(patched, *conditioning(tiny, "sd15", 2), images=2)
    assert "SharedAttentionStyleAlign" not in caplog.text


# -- style from a real image ------------------------------------------------------------


@pytest.fixture(scope="module")
def inversion_nodes(host):
    return host.module("nodes.inversion")


PHOTO_STEPS = 3


def sample_ddim(model, positive, negative, noise, cfg=5.0):
    import comfy.sample

    return comfy.sample.sample(model, noise, PHOTO_STEPS, cfg, "euler", "ddim_uniform", first_rows(positive, len(noise)),
                               first_rows(negative, len(noise)), torch.zeros_like(noise), seed=0, disable_pbar=True)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_reference_follows_the_photo_inversion(tiny, sa, core, inversion_nodes, name):
    model = {"sd15": tiny.sd15_unet, "sdxl": tiny.sdxl_unet}[name](seed=3)
    positive, negative = conditioning(tiny, name, IMAGES)
    photo = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(21))  # a "photo" latent
    photo_prompt, photo_negative = conditioning(tiny, name, 1, seed=9)
    _, inversion = inversion_nodes.invert(model, photo, photo_prompt, photo_negative, cfg=2.0, steps=PHOTO_STEPS)
    styled = style_align(sa, core, model, share_group_norm="on", shared_score_shift=math.log(2))
    from_photo = sa.StyleAlignedReferenceFromInversion.execute(styled, inversion, photo_prompt, 1).result[0]

    out = sample_ddim(from_photo, positive, negative, NOISE)
    other_noise = NOISE.clone()
    other_noise[0] = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(99))
    # the reference row is the inversion at every call, whatever noise the batch gave it: the
    # other images do not depend on that noise at all, and the reference ends on the model's
    # reconstruction of the photo (the last euler step returns the denoised latent)
    moved = sample_ddim(from_photo, positive, negative, other_noise)
    assert torch.equal(moved[1:], out[1:])
    assert relative(moved[0], out[0]) <= 1e-4
    assert torch.isfinite(out).all()
    # and the other images take its (the photo's) style rather than the generated reference's
    without_photo = sample_ddim(styled, positive, negative, NOISE)
    assert min(relative(out[i], without_photo[i]) for i in range(1, IMAGES)) > 1e-2
    if name == "sdxl":
        return
    # batch of one: nothing to share, nothing replaced
    assert torch.equal(sample_ddim(from_photo, positive, negative, NOISE[:1]),
                       sample_ddim(model, positive, negative, NOISE[:1]))


def test_photo_node_errors_name_their_input(tiny, sa, core, inversion_nodes):
    model = tiny.sd15_unet(seed=3)
    photo_prompt, photo_negative = conditioning(tiny, "sd15", 1, seed=9)
    _, inversion = inversion_nodes.invert(model, torch.randn(1, 4, 8, 8), photo_prompt, photo_negative, cfg=2.0,
                                          steps=2)
    with pytest.raises(ValueError, match="model: connect a MODEL patched by SharedAttentionStyleAlign"):
        sa.apply_reference_from_inversion(model, inversion, photo_prompt, 0)
    styled = style_align(sa, core, model)
    with pytest.raises(ValueError, match="offset: expected 0..1"):
        sa.apply_reference_from_inversion(styled, inversion, photo_prompt, 5)
    counted, calls = counting_unet_calls(styled)
    patched = sa.apply_reference_from_inversion(counted, inversion, photo_prompt, 0)
    positive, negative = conditioning(tiny, "sd15", 2)
    with pytest.raises(ValueError, match=r"StyleAlignedReferenceFromInversion: inversion: the inverted latent "
                                         r"is 4x8x8 .* the latent being sampled is 4x16x16.*64x64 pixels"):
        sample_ddim(patched, positive, negative, NOISE[:2])
    assert calls == []  # refused before the first UNet call


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_self_attention_sizes_are_the_ones_sampling_sees(tiny, sa, name):
    model = {"sd15": tiny.sd15_unet, "sdxl": tiny.sdxl_unet}[name](seed=3).clone()
    seen = {}

    def attn1(q, k, v, extra_options):
        seen[tuple(extra_options["block"])] = (q.shape[1], q.shape[2])
        return q, k, v

    model.set_model_attn1_patch(attn1)
    sample(model, *conditioning(tiny, name, 1), images=1)
    assert seen and sa.self_attention_sizes(model.model.diffusion_model, 16, 16) == seen


def test_a_batch_whose_shared_attention_does_not_fit_is_refused_before_sampling(tiny, sa, core, monkeypatch):
    import comfy.model_management

    model, calls = counting_unet_calls(tiny.sd15_unet(seed=3))
    patched = style_align(sa, core, model, share_group_norm="on")
    technique = [t for t in sa.router_of(patched).techniques if isinstance(t, core.StyleAligned)][0]
    free = sa.patch_extra_bytes(patched, technique, True, 3, 16, 16)  # room for 3 images, not 4
    assert sa.patch_extra_bytes(patched, technique, True, 4, 16, 16) > free
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: free)
    images = 4
    positive, negative = conditioning(tiny, "sd15", images)
    noise = torch.randn(images, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    import comfy.sample

    with pytest.raises(ValueError, match=r"SharedAttentionStyleAlign: a latent batch of 4 images would need about .* "
                                         r"at most 3 images fit: lower the latent batch_size to 3"):
        comfy.sample.sample(patched, noise, STEPS, 5.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                            seed=0, disable_pbar=True)
    assert calls == []
    out = sample(patched, positive, negative, images=2)  # two images fit
    assert torch.isfinite(out).all() and len(calls) > 0
