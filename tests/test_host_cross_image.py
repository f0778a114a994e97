"""CrossImageAttention inside real ComfyUI sampling (tiny SD1.5 and SDXL, random weights).

The issue's invariants: with structure == appearance, contrast 1 and swap guidance
off the transfer is the structure's own replay; otherwise the patch changes the
output. The call plan checks that the appearance and structure branches are read
from their inversions, never denoised, and what each step costs in UNet rows.
"""


import pytest
import torch

STEPS = 12  # skip 0.32 -> 4 skipped, 8 denoising steps
STRUCTURE_PROMPT, APPEARANCE_PROMPT = "A photo of a cat", "A photo of a dog"


@pytest.fixture(scope="module")
def xi(host):
    return host.module("nodes.cross_image")


@pytest.fixture(scope="module")
def inv(host):
    return host.module("nodes.inversion")


def user_latent(model, seed, shape=(1, 4, 16, 16)):
    internal = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return model.model.process_latent_out(internal)


def invert(inv, xi, model, clip, prompt, seed, shape=(1, 4, 16, 16), steps=STEPS):
    positive = xi.encode(clip, prompt)
    _, inversion = inv.invert(model, user_latent(model, seed, shape), positive, steps=steps, method="ddpm", seed=seed)
    return inversion


@pytest.fixture(scope="module")
def sd15(tiny, inv, xi):
    model, clip = tiny.sd15_unet(seed=3), tiny.text_encoder(seed=4)
    structure = invert(inv, xi, model, clip, STRUCTURE_PROMPT, seed=1)
    appearance = invert(inv, xi, model, clip, APPEARANCE_PROMPT, seed=2)
    return model, clip, structure, appearance


def test_same_image_without_contrast_or_guidance_is_the_structure_replay(sd15, xi, inv):
    model, clip, structure, _ = sd15
    out, guider = xi.transfer(model, clip, structure, structure,
                              xi.CrossImageSettings("cat", "cat", contrast=1.0, swap_guidance=1.0))
    reference = inv.replay(model, structure, xi.encode(clip, STRUCTURE_PROMPT), start=guider.skipped_steps,
                           add_final_residual=False)
    assert guider.skipped_steps == 4 and guider.masks is not None  # the swap and masked AdaIN ran
    assert (out - reference).abs().max().item() <= 1e-4


def test_transfer_changes_the_output_and_reports_its_masks(sd15, xi, inv):
    model, clip, structure, appearance = sd15
    out, guider = xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings("cat", "dog"))
    reference = inv.replay(model, structure, xi.encode(clip, STRUCTURE_PROMPT), start=guider.skipped_steps,
                           add_final_residual=False)
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max().item() > 1e-2
    for branch in ("structure", "appearance"):
        mask = guider.masks[branch]
        assert mask.shape == (1, 16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0} and mask.any()
    # each ingredient alone changes the result
    plain, _ = xi.transfer(model, clip, structure, appearance,
                           xi.CrossImageSettings("cat", "dog", contrast=1.0, swap_guidance=1.0, masked_adain=False))
    assert (plain - reference).abs().max().item() > 1e-3  # the swap itself
    contrasted, _ = xi.transfer(model, clip, structure, appearance,
                                xi.CrossImageSettings("cat", "dog", swap_guidance=1.0, masked_adain=False))
    assert (contrasted - plain).abs().max().item() > 1e-4


def test_call_plan_reads_branches_from_their_inversions(sd15, xi):
    """Per step: plain steps 1 row; swap steps the source image (1 row) + swapped and unswapped output
    (2 rows); the mask step 2 recording calls. Source latents are the inversions' own."""
    model, clip, structure, appearance = sd15
    calls = []
    watched = model.clone()

    def watch(apply_model, args):
        calls.append((float(args["timestep"][0]), args["input"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched.set_model_unet_function_wrapper(watch)
    _, guider = xi.transfer(watched, clip, structure, appearance, xi.CrossImageSettings("cat", "dog"))
    by_step = {}
    for sigma, x in calls:
        by_step.setdefault(guider.step_at(sigma), []).append(x)
    plan = guider.plan
    for step in range(plan.steps):
        rows = [x.shape[0] for x in by_step[step]]
        expected = [1]
        if plan.swaps(step):
            expected = [1, 2]
        if step == plan.adain_step:
            expected = [1, 1] + expected
        assert rows == expected, (step, rows)
        if plan.swaps(step):
            source = guider.latent(plan.source(step), step, "cpu")
            assert torch.equal(by_step[step][-2].cpu().float(), source)
    assert {plan.source(s) for s in range(plan.steps) if plan.swaps(s)} == {"structure", "appearance"}
    # the authors' pipeline: 3 branches x 2 passes = 6 rows at every step
    assert sum(x.shape[0] for _, x in calls) <= 6 * plan.steps / 2


def test_text_cfg_sdxl_and_an_appearance_of_another_size(tiny, inv, xi):
    model, clip = tiny.sdxl_unet(seed=3), tiny.text_encoder(seed=4)
    structure = invert(inv, xi, model, clip, STRUCTURE_PROMPT, seed=1, steps=8)
    appearance = invert(inv, xi, model, clip, APPEARANCE_PROMPT, seed=2, shape=(1, 4, 12, 20), steps=8)
    out, guider = xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings("cat", "dog"))
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    assert guider.masks["appearance"].shape == (1, 12, 20)
    with_cfg, _ = xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings("cat", "dog", cfg=3.0))
    assert torch.isfinite(with_cfg).all() and (with_cfg - out).abs().max().item() > 1e-4


def test_clear_errors(sd15, tiny, inv, xi):
    model, clip, structure, appearance = sd15
    other = invert(inv, xi, model, clip, APPEARANCE_PROMPT, seed=2, steps=10)
    with pytest.raises(ValueError, match="CrossImageAttention: appearance: inverted over another schedule"):
        xi.transfer(model, clip, structure, other, xi.CrossImageSettings("cat", "dog"))
    with pytest.raises(ValueError, match="CrossImageAttention: appearance_object: 'zebra' is not in the prompt"):
        xi.transfer(model, clip, structure, appearance,
                    xi.CrossImageSettings("cat", "zebra", prompt="a photo of a cat and a dog"))
    with pytest.raises(ValueError, match="CrossImageAttention: structure_object: name the object"):
        xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings(" ", "dog"))
    with pytest.raises(ValueError, match="CrossImageAttention: structure: expected an INVERSION"):
        xi.transfer(model, clip, "not an inversion", appearance, xi.CrossImageSettings("cat", "dog"))
    with pytest.raises(ValueError, match="swap_start"):
        xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings("cat", "dog", swap_start=0.9,
                                                                              swap_end=0.5))


def test_controlnet_steers_the_output_branch_only(sd15, xi, tiny):
    """A stand-in ControlNet on `output_conditioning`: it is asked for residuals once per step, for the
    output rows only (never for the appearance/structure source calls), and changes the output."""
    model, clip, structure, appearance = sd15
    asked = []

    plain, guider = xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings("cat", "dog"))
    control = tiny.stub_controlnet(asked)
    controlled_cond = [[c, dict(extra, control=control)] for c, extra in xi.encode(clip, STRUCTURE_PROMPT)]
    controlled, _ = xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings("cat", "dog"),
                                output_conditioning=controlled_cond)
    plan = guider.plan
    assert asked == [2 if plan.swaps(step) else 1 for step in range(plan.steps)]
    assert (controlled - plain).abs().max().item() > 1e-3


def test_refuses_ddim_inversions_and_names_the_steps_it_was_given(sd15, tiny, inv, xi):
    model, clip, structure, appearance = sd15
    positive = xi.encode(clip, APPEARANCE_PROMPT)
    _, ddim = inv.invert(model, user_latent(model, 2), positive, steps=STEPS, method="ddim")
    with pytest.raises(ValueError, match="CrossImageAttention: appearance: a 'ddim' inversion;.*method 'ddpm'"):
        xi.transfer(model, clip, structure, ddim, xi.CrossImageSettings("cat", "dog"))
    with pytest.raises(ValueError, match="CrossImageAttention: structure: a 'ddim' inversion"):
        xi.transfer(model, clip, ddim, appearance, xi.CrossImageSettings("cat", "dog"))
    # ddim_uniform walks 13 steps when asked for 12: the message names the steps the user set
    assert structure.num_steps != STEPS and structure.steps == STEPS
    eight = invert(inv, xi, model, clip, APPEARANCE_PROMPT, seed=2, steps=8)
    with pytest.raises(ValueError, match="another schedule than the structure \\(8 steps against the structure's 12\\)"):
        xi.transfer(model, clip, structure, eight, xi.CrossImageSettings("cat", "dog"))


def test_an_appearance_of_another_size_is_named_in_a_warning(sd15, inv, xi, caplog):
    model, clip, structure, _ = sd15
    wide = invert(inv, xi, model, clip, APPEARANCE_PROMPT, seed=2, shape=(1, 4, 12, 20))
    with caplog.at_level("WARNING", logger="attention_lab"):
        xi.check_inversions(model, structure, wide)
    assert "CrossImageAttention: appearance: its latent is 12x20, the structure's 16x16" in caplog.text


def test_object_words_missing_from_the_prompt_are_refused_when_the_graph_is_validated(host):
    """ComfyUI's own prompt validation refuses the graph, so neither DDIMInvert runs."""
    import asyncio
    import json
    from pathlib import Path

    workflow = json.loads((Path(__file__).resolve().parents[1] / "examples" / "cross_image_transfer.json").read_text())
    prompt = host.to_prompt(workflow)
    node_id = next(k for k, v in prompt.items() if v["class_type"] == "CrossImageAttention")
    valid, _, _, errors = asyncio.run(host.execution.validate_prompt("t", prompt, None))
    assert valid, errors
    prompt[node_id]["inputs"].update(prompt="a photo of a star", structure_object="star", appearance_object="square")
    valid, _, _, errors = asyncio.run(host.execution.validate_prompt("t", prompt, None))
    assert not valid
    text = json.dumps(errors[node_id])
    assert "CrossImageAttention: appearance_object:" in text and "is not in the prompt" in text
    cls = host.nodes.NODE_CLASS_MAPPINGS["CrossImageAttention"]
    assert "structure_object: name the object" in cls.validate_inputs(" ", "dog", "a {}")
    assert cls.validate_inputs("cat", "dog", "a {}") is True


def test_masks_read_every_layer_of_the_two_top_decoder_levels(sd15, xi, host):
    """One layer's self-attention can be near-uniform on a small model (the demo model's last 16² layer), so
    the clusters come from the mean over the highest decoder level's layers, the labels from the next level's."""
    model, clip, structure, appearance = sd15
    patching = host.module("nodes.patching")
    levels = patching.decoder_levels(model)
    _, guider = xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings("cat", "dog"))
    assert guider.recorder.selection.layers == frozenset(levels[0] + levels[1])


def test_adain_background_matches_the_background_outside_the_masks(sd15, xi, host):
    """With planted masks: the object is matched either way; adain_background also moves the background's
    statistics (outside the structure's mask) to those of the appearance's background."""
    ci = host.module("attention_patches.cross_image")
    model, clip, structure, appearance = sd15
    _, guider = xi.transfer(model, clip, structure, appearance, xi.CrossImageSettings("cat", "dog"))
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:10, 5:12] = 1
    guider.masks = {"structure": mask, "appearance": torch.roll(mask, 3, -1)}
    step = guider.plan.adain_step
    x = guider.latent("structure", step + 1, "cpu")
    object_only = guider.after_step(step, x)
    guider.adain_background = True
    both = guider.after_step(step, x)
    inside = mask[0] > 0.5
    assert torch.allclose(both[..., inside], object_only[..., inside])
    assert torch.allclose(object_only[..., ~inside], x[..., ~inside], atol=1e-5)
    scale = xi.vp_scale(float(guider.sigmas[step + 1]))
    style = guider.latent("appearance", step + 1, "cpu")[0] / scale
    expected = ci.masked_adain(object_only[0] / scale, style, 1 - mask[0], 1 - guider.masks["appearance"][0]) * scale
    assert torch.allclose(both[0], expected, atol=1e-5)
    assert (both - object_only)[..., ~inside].abs().max().item() > 1e-3


def test_the_node_hands_every_setting_to_the_transfer_by_name(xi):
    """Each widget of the node is a field of CrossImageSettings of the same name, with the same default
    (to the widget's rounding); the inputs that are not settings are the model, the clip, the two
    inversions and the output conditioning."""
    import dataclasses

    schema = xi.CrossImageAttention.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    fields = {f.name: f for f in dataclasses.fields(xi.CrossImageSettings)}
    assert set(inputs) - set(fields) == {"model", "clip", "structure", "appearance", "output_conditioning"}
    assert set(fields) <= set(inputs)
    for name, field in fields.items():
        if field.default is not dataclasses.MISSING:
            assert inputs[name].default == pytest.approx(field.default, abs=5e-4), name
