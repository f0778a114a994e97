"""BoundedAttentionLayout in real ComfyUI: subject resolution, errors, masks-only and guided sampling."""

import json
from pathlib import Path

import pytest
import torch

PROMPT = "a ginger kitten and a gray puppy in a yard"
SUBJECTS = "ginger kitten\ngray puppy"
BOXES = "[[0.05, 0.2, 0.45, 0.8], [0.55, 0.2, 0.95, 0.8]]"
STEPS = 4
# the boxes text as web/bounded_boxes.js writes it and as users type it; tests/test_web_box_editor.py reads it too
BOX_CASES = json.loads((Path(__file__).parent / "box_format_cases.json").read_text())


@pytest.fixture(scope="module")
def node(host):
    return host.module("nodes.bounded")


@pytest.fixture(scope="module")
def clip(tiny):
    return tiny.text_encoder()


def inputs(**overrides):
    values = dict(prompt=PROMPT, subjects=SUBJECTS, boxes=BOXES, width=128, height=128, guidance="bounded",
                  guidance_steps=2, iterations_per_step=2, step_size_start=0.0, step_size_end=0.0, loss_threshold=0.2,
                  cross_loss_scale=1.5, self_loss_scale=0.5, mask_eos=True, filter_words=True)
    values.update(overrides)
    return values


def conditioning(tiny, family):
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(1, 77, tiny.TEXT_HIDDEN, generator=g)
    extra = {"pooled_output": torch.randn(1, tiny.SDXL_POOLED, generator=g), "width": 128, "height": 128} if family == "sdxl" else {}
    uncond_extra = dict(extra, pooled_output=torch.zeros(1, tiny.SDXL_POOLED)) if extra else {}
    return [[cond, dict(extra)]], [[torch.zeros_like(cond), uncond_extra]]


def sample(model, positive, negative, cfg=5.0, steps=STEPS):
    import comfy.sample

    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def test_subjects_resolve_to_the_authors_token_indices(node, clip):
    boxes = node.parse_boxes(BOXES, node.parse_subjects(SUBJECTS), 512, 512)
    layout = node.resolve_layout(clip, PROMPT, node.parse_subjects(SUBJECTS), boxes, filter_words=True)
    assert layout.subject_tokens == ((2, 3), (6, 7))  # run_sd.py's subject_token_indices for this prompt
    assert layout.eos_token == 11
    assert layout.filter_tokens == (1, 4, 5, 8, 9)  # a, and, a, in, a
    assert layout.leading_tokens == (3, 7)  # kitten, puppy


def test_boxes_in_pixels_or_by_subject(node):
    subjects = ["cat", "dog"]
    assert node.parse_boxes("[[0, 128, 256, 384], [256, 0, 512, 256]]", subjects, 512, 512) == [
        (0.0, 0.25, 0.5, 0.75), (0.5, 0.0, 1.0, 0.5)]
    assert node.parse_boxes('{"dog": [0.5, 0, 1, 1], "cat": [0, 0, 0.5, 1]}', subjects, 64, 64)[0] == (0, 0, 0.5, 1)


@pytest.mark.parametrize("case", BOX_CASES["formatted"], ids=lambda case: case["text"])
def test_the_node_reads_back_what_the_editor_writes(node, case):
    subjects = "\n".join(case["subjects"])
    view = node.editor_view(subjects, case["text"], 512, 512)
    assert view == {"subjects": case["subjects"], "boxes": case["read"], "problem": ""}
    complete = len(case["read"]) == len(case["subjects"]) and None not in case["read"]
    if complete:
        assert node.parse_boxes(case["text"], case["subjects"], 512, 512) == [tuple(b) for b in case["read"]]
    else:  # a subject without a box: the editor asks for it, the node refuses to run without it
        with pytest.raises(ValueError, match="no box for subject"):
            node.parse_boxes(case["text"], case["subjects"], 512, 512)


@pytest.mark.parametrize("case", BOX_CASES["typed"], ids=lambda case: case["text"])
def test_the_editor_shows_what_the_node_would_run_or_refuse(node, case):
    view = node.editor_view(case["subjects"], case["text"], case["width"], case["height"])
    assert view["subjects"] == node.subject_lines(case["subjects"])
    assert view["boxes"] == case["shown"]  # the cases' pixel boxes divide exactly
    subjects = view["subjects"]
    if case["problem"]:
        assert case["problem"] in view["problem"] and view["problem"].startswith("boxes: ")
        with pytest.raises(ValueError) as refused:
            node.parse_boxes(case["text"], subjects, case["width"], case["height"])
        assert str(refused.value) == f"{node.NODE}: {view['problem']}"  # the node's own words
    else:
        assert view["problem"] == ""
        assert node.parse_boxes(case["text"], subjects, case["width"], case["height"]) == [
            tuple(b) for b in case["shown"]]


@pytest.mark.parametrize("overrides,message", [
    (dict(subjects="ginger kitten\nblue whale"), "'blue whale' is not in the prompt"),
    (dict(boxes="[[0.05, 0.2, 1.45, 0.8], [0.55, 0.2, 0.95, 0.8]]"), "outside \\[0, 1\\]"),
    (dict(boxes="[[0.5, 0.2, 0.5, 0.8], [0.55, 0.2, 0.95, 0.8]]"), "is empty"),
    (dict(boxes="[[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 1, 1]]"), "3 boxes for 2 subjects"),
    (dict(boxes="[[0, 0, 0.5, 0.5]]"), "no box for subject\\(s\\) \\['gray puppy'\\]"),
    (dict(boxes="[[0, 0, 0.5, 0.5], "), "boxes: not valid JSON"),
    (dict(boxes="[[0, 0, 700, 100], [0, 0, 10, 10]]", width=512), "outside \\[0, 1\\]"),
    # every choice named, "off" included
    (dict(guidance="boxdiff"), "BoundedAttentionLayout: guidance: expected one of bounded, layout_guidance, "
                               "attend_and_excite, off, got 'boxdiff'"),
])
def test_clear_errors(node, tiny, clip, overrides, message):
    with pytest.raises(ValueError, match=message):
        node._apply(tiny.sd15_unet(seed=0), clip, **inputs(**overrides))


def test_unsupported_family_is_refused(node, clip, host):
    class FakeFlux:
        class model:  # noqa: N801 - mimics ModelPatcher.model
            diffusion_model = torch.nn.Linear(1, 1)

        model_options = {}

        def clone(self):
            return self

    with pytest.raises(ValueError, match=r"BoundedAttentionLayout: the model is .*; BoundedAttentionLayout supports SD1\.x/SD2\.x/SDXL UNet models"):
        node._apply(FakeFlux(), clip, **inputs())


def test_sd2_style_unet_uses_the_sd15_layers_and_sdxl_its_own(node, tiny, clip, host):
    patching = host.module("nodes.patching")
    for make, family in ((tiny.sd2v_unet, "sd15"), (tiny.sdxl_unet, "sdxl")):
        # at the authors' size (SD1.x 512 px, SDXL 1024 px): their blocks
        size = {"sd15": 512, "sdxl": 1024}[family]
        patched = node._apply(make(seed=0), clip, **inputs(width=size, height=size))
        probe = next(t for t in patching.router_of(patched).techniques if t.name == "bounded_guidance")
        assert probe.loss_layers == host.module("attention_patches.bounded").LOSS_LAYERS[family]
        assert probe.config.step_size_start == {"sd15": 8.0, "sdxl": 18.0}[family]


@pytest.mark.parametrize("family,dtype", [("sd15", torch.float32), ("sd15", torch.float16), ("sdxl", torch.float16)])
def test_masks_only_sampling(node, tiny, clip, family, dtype):
    with torch.inference_mode():
        model = {"sd15": tiny.sd15_unet, "sdxl": tiny.sdxl_unet}[family](seed=3, dtype=dtype)
        positive, negative = conditioning(tiny, family)
        base = sample(model, positive, negative)
        patched = node._apply(model, clip, **inputs(guidance="off"))
        out = sample(patched, positive, negative)
        again = sample(model, positive, negative)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3  # the masks change the result
    assert torch.equal(again, base)  # the input MODEL is untouched


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_guidance_in_inference_mode_changes_the_latent(node, tiny, clip, family):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes: weights are inference tensors
        model = {"sd15": tiny.sd15_unet, "sdxl": tiny.sdxl_unet}[family](seed=3)
        positive, negative = conditioning(tiny, family)
        masks_only = sample(node._apply(model, clip, **inputs(guidance="off")), positive, negative, steps=3)
        guided_model = node._apply(model, clip, **inputs(loss_threshold=0.0))
        guided = sample(guided_model, positive, negative, steps=3)
    wrapper = guided_model.get_wrappers("calc_cond_batch", node.WRAPPER_KEY)[0]
    assert [step for step, _ in wrapper.losses] == [0, 1]  # guidance_steps=2 of 3
    assert all(len(losses) == 2 for _, losses in wrapper.losses)
    assert torch.isfinite(guided).all() and (guided - masks_only).abs().max() > 1e-3
    # no graph survives sampling
    assert not guided.requires_grad


def test_guidance_with_cond_and_uncond_in_separate_calls_matches_one_call(node, tiny, clip):
    with torch.inference_mode():
        model = tiny.sd15_unet(seed=3)
        positive, negative = conditioning(tiny, "sd15")
        together = sample(node._apply(model, clip, **inputs(guidance_steps=1)), positive, negative, steps=2)
        split = node._apply(model, clip, **inputs(guidance_steps=1))
        split.add_object_patch("memory_required", lambda *args, **kwargs: 1e30)
        separate = sample(split, positive, negative, steps=2)
    assert (separate - together).abs().max() < 1e-4 * together.abs().max()


def test_a_size_whose_attention_maps_cannot_fit_is_refused_by_the_node(node, tiny, clip):
    # 8192² px: guidance's self-attention maps at 256² tokens alone are hundreds of GiB
    with pytest.raises(ValueError, match=r"BoundedAttentionLayout: width/height: a 8192x8192 px latent \(1 image\(s\)\) "
                                         r"needs about .* GiB .*guidance .* is free .*; at most \d+x\d+ px fits"):
        node._apply(tiny.sd15_unet(seed=0), clip, **inputs(width=8192, height=8192))
    # masks alone need no N×N map: the same size is accepted
    node._apply(tiny.sd15_unet(seed=0), clip, **inputs(width=8192, height=8192, guidance="off", refine_masks=False))


def test_the_sampled_latent_is_checked_before_the_first_unet_call(node, tiny, clip, monkeypatch):
    import comfy.model_management

    model = node._apply(tiny.sd15_unet(seed=0), clip, **inputs(refine_masks=True))
    check = model.get_wrappers("outer_sample", node.RUN_WRAPPER_KEY)[0].memory
    small, large = (sum(check.needed((n, n), 1).values()) for n in (16, 128))
    assert large > 2 * small
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: (small + large) // 2)
    calls = []
    model.set_model_unet_function_wrapper(lambda apply, c: calls.append(1) or apply(c["input"], c["timestep"], **c["c"]))
    positive, negative = conditioning(tiny, "sd15")
    import comfy.sample

    noise = torch.randn(1, 4, 128, 128)
    with pytest.raises(ValueError, match=r"the latent's size: a 1024x1024 px latent .* at most \d+x\d+ px fits"):
        comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                            seed=0, disable_pbar=True)
    assert not calls
    sample(model, positive, negative, steps=2)  # 128 px fits
    assert calls


def test_guidance_runs_at_the_schedules_own_sigmas_not_at_a_samplers_intermediate_ones(node, tiny, clip):
    """dpm_2 also evaluates the model between two sigmas of the schedule: those calls are not guided steps."""
    import comfy.sample

    with torch.inference_mode():
        model = node._apply(tiny.sd15_unet(seed=3), clip, **inputs(loss_threshold=0.0))
        positive, negative = conditioning(tiny, "sd15")
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))
        sigmas_seen = []
        model.set_model_unet_function_wrapper(
            lambda apply_model, args: sigmas_seen.append(float(args["timestep"][0])) or apply_model(
                args["input"], args["timestep"], **args["c"]))
        out = comfy.sample.sample(model, noise, 3, 5.0, "dpm_2", "normal", positive, negative,
                                  torch.zeros_like(noise), seed=0, disable_pbar=True)
    wrapper = model.get_wrappers("calc_cond_batch", node.WRAPPER_KEY)[0]
    assert len(set(sigmas_seen)) > 4  # the schedule's 3 sigmas and dpm_2's midpoints were evaluated
    assert [step for step, _ in wrapper.losses] == [0, 1]
    assert torch.isfinite(out).all()
