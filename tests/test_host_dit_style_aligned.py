"""SharedAttentionStyleAlign on tiny Flux and SD3 models inside real ComfyUI sampling."""

import math

import pytest
import torch

from test_dit_style_aligned import joint_equation

STEPS = 3


@pytest.fixture(scope="module")
def node(host):
    return host.module("nodes.style_aligned")


@pytest.fixture(scope="module", params=["flux", "sd3"])
def family(request, tiny_dit):
    name = request.param
    model = tiny_dit.model(name, seed=3)
    positive, negative = tiny_dit.conds(seed=5, flux=name == "flux")
    return name, model, positive, negative


def sample(model, positive, negative, cfg, batch=3):
    import comfy.sample

    noise = torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(11))
    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def style_align(node, model, **overrides):
    kwargs = dict(reference_index=0, share_with="all", shared_score_scale=1.0, shared_score_shift=0.0,
                  adain_queries=True, adain_keys=True, adain_values=False, share_group_norm="auto",
                  full_attention_share=False, only_self_level=0.0, blocks="all", start_percent=0.0,
                  end_percent=1.0, reference_gets_control=False, dit_blocks="auto")
    kwargs.update(overrides)
    return node.SharedAttentionStyleAlign.execute(model, **kwargs).result[0]


@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["cfg1", "cfg3"])
def test_reference_and_unlisted_images_unchanged(family, node, cfg):
    name, model, positive, negative = family
    plain = sample(model, positive, negative, cfg)
    patched = style_align(node, model)
    out = sample(patched, positive, negative, cfg)
    assert (out[0] - plain[0]).abs().max() <= 1e-5  # the reference samples as without the node
    for target in (1, 2):
        assert (out[target] - plain[target]).abs().max() > 1e-2
    only_one = sample(style_align(node, model, share_with="1"), positive, negative, cfg)
    assert (only_one[2] - plain[2]).abs().max() <= 1e-5  # an image not in share_with samples unpatched
    assert (only_one[1] - out[1]).abs().max() <= 1e-5  # and image 1 shares exactly as before


def test_sharing_layers_and_the_equations_inside_the_model(family, node, host):
    """Captured at a sharing layer of the real model (Flux: post-RoPE q/k), the output is the joint-layout equation."""
    name, model, positive, negative = family
    options = dict(shared_score_scale=0.8, shared_score_shift=math.log(2))
    patched = style_align(node, model, **options)
    router = host.module("nodes.patching").router_of(patched)
    technique = [t for t in router.techniques if t.name == "SharedAttentionStyleAlign"][0]
    expected_layers = ({l for l in router.layers if l[0] == "single_block"} if name == "flux" else set(router.layers))
    assert technique.layers == expected_layers
    captured = []

    class Capture(host.module("attention_patches").AttentionTechnique):  # outermost: sees the call before StyleAligned
        families = frozenset({"flux", "sd3"})
        order = 0

        def __call__(self, q, k, v, call, attend, mask=None):
            out = attend(q, k, v, mask)
            if tuple(call.layer) in technique.layers:
                captured.append((call, q, k, v, out))
            return out

    router.add(Capture())
    sample(patched, positive, negative, cfg=3.0)
    assert len(captured) == len(technique.layers) * STEPS
    settings = technique.settings.attention
    for call, q, k, v, out in captured[:: max(1, len(captured) // 4)]:
        layout = call.layout
        for chunk in range(len(layout.cond_or_uncond)):
            ref = layout.row(chunk, 0)
            for image in (1, 2):
                row = layout.row(chunk, image)
                want = joint_equation(q, k, v, row, ref, settings, text=call.text_tokens, image=call.tokens,
                                      heads=call.heads)
                assert torch.allclose(out[row].double(), want, atol=1e-4), (call.layer, chunk, image)


def test_dit_inputs_are_checked(family, node):
    name, model, positive, negative = family
    with pytest.raises(ValueError, match="SharedAttentionStyleAlign: blocks: 'output' names UNet blocks"):
        style_align(node, model, blocks="output")
    with pytest.raises(ValueError, match="SharedAttentionStyleAlign: share_group_norm: the model is"):
        style_align(node, model, share_group_norm="on")
    with pytest.raises(ValueError, match="full_attention_share is not offered on Flux and SD3"):
        style_align(node, model, full_attention_share=True)
    if name == "sd3":
        with pytest.raises(ValueError, match="dit_blocks: 'single' selects no block of this sd3 model"):
            style_align(node, model, dit_blocks="single")
    patched = style_align(node, model, reference_index=5)
    with pytest.raises(ValueError, match="reference_index is 5 but the batch has 3 image"):
        sample(patched, positive, negative, cfg=1.0)


def test_applying_twice_replaces_and_the_base_is_untouched(family, node, host):
    name, model, positive, negative = family
    plain = sample(model, positive, negative, cfg=1.0)
    once = style_align(node, model, dit_blocks="all")
    twice = style_align(node, once, dit_blocks="double")
    router = host.module("nodes.patching").router_of(twice)
    shared = [t for t in router.techniques if t.name == "SharedAttentionStyleAlign"]
    assert len(shared) == 1 and all(l[0] == "double_block" for l in shared[0].layers)
    assert (sample(model, positive, negative, cfg=1.0) - plain).abs().max() == 0


def test_a_batch_whose_shared_attention_does_not_fit_is_refused_before_sampling(family, node, host, monkeypatch):
    import comfy.model_management

    name, model, positive, negative = family
    dit_nodes = host.module("nodes.style_aligned_dit")
    patched = style_align(node, model)
    router = host.module("nodes.patching").router_of(patched)
    technique = [t for t in router.techniques if t.name == "SharedAttentionStyleAlign"][0]
    text = positive[0][0].shape[1]
    free = dit_nodes.dit_extra_bytes(patched, technique, 2, 16, 16, text)  # room for 2 images, not 3
    assert dit_nodes.dit_extra_bytes(patched, technique, 3, 16, 16, text) > free
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: free)
    with pytest.raises(ValueError, match=r"SharedAttentionStyleAlign: a latent batch of 3 images would need about .* "
                                         r"at most 2 images fit: lower the latent batch_size to 2"):
        sample(patched, positive, negative, cfg=3.0)
    assert torch.isfinite(sample(patched, positive, negative, cfg=3.0, batch=2)).all()


def test_half_precision_matches_float32(node, tiny_dit):
    """fp16 sampling; bf16 is checked per attention call in test_dit_style_aligned.py (a random-weight model in
    bf16 drifts from float32 by more than StyleAligned's effect within three steps)."""
    dtype = torch.float16
    positive, negative = tiny_dit.conds(seed=5, flux=True)
    effects = {}
    for run_dtype in (torch.float32, dtype):
        model = tiny_dit.flux_model(seed=3, dtype=run_dtype)
        plain = sample(model, positive, negative, cfg=1.0)
        out = sample(style_align(node, model, shared_score_shift=math.log(2)), positive, negative, cfg=1.0)
        assert torch.isfinite(out).all()
        assert (out[0] - plain[0]).abs().max() <= 1e-2 * plain[0].abs().max()  # the reference, up to rounding
        effects[run_dtype] = (out[1:] - plain[1:]).flatten()
    # what StyleAligned does to the targets in half precision is what it does in float32
    cosine = torch.nn.functional.cosine_similarity(effects[torch.float32], effects[dtype], dim=0)
    assert cosine > 0.9, cosine


def test_style_from_a_photo_refuses_dits_by_name(family, node):
    name, model, positive, negative = family
    patched = style_align(node, model)
    with pytest.raises(ValueError, match="StyleAlignedReferenceFromInversion: model: the model is (Flux|SD3); style "
                                         "from a photo supports SD1.x"):
        node.apply_reference_from_inversion(patched, None, positive, 5)


def test_the_reference_gets_no_controlnet_residuals_unless_asked(family, node, host):
    """ComfyUI hands apply_model the residuals already computed: the reference rows of each chunk are zeroed."""
    name, model, positive, negative = family
    dit_nodes = host.module("nodes.style_aligned_dit")
    patched = style_align(node, model, reference_index=1)
    import comfy.patcher_extension

    wrappers = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, dit_nodes.CONTROL_WRAPPER_KEY)
    assert len(wrappers) == 1
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen["control"] = control
        return x

    residual = torch.ones(6, 64, 8)  # [uncond×3, cond×3] rows of a Flux-style residual
    control = {"input": [residual, None], "output": [residual]}
    wrappers[0](executor, torch.zeros(6, 16, 16, 16), None, None, None, control, {"cond_or_uncond": [1, 0]})
    for out in (seen["control"]["input"][0], seen["control"]["output"][0]):
        assert out[[1, 4]].abs().max() == 0 and (out[[0, 2, 3, 5]] == 1).all()
    assert seen["control"]["input"][1] is None and (residual == 1).all()  # new tensors, the given ones untouched
    keeps = style_align(node, model, reference_gets_control=True)
    assert not keeps.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, dit_nodes.CONTROL_WRAPPER_KEY)
