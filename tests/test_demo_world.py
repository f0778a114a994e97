"""The demo world: reproducible scenes, captions that say what is drawn, exact masks, exact detectors."""

import numpy as np
import pytest
from scipy import ndimage

from attention_lab.demo import detect, world

SEEDS = range(60)


def test_same_seed_same_scene_other_seed_other_scene():
    a, b = world.render(world.random_scene(7)), world.render(world.random_scene(7))
    assert a.scene == b.scene and a.caption == b.caption
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.boxes == b.boxes
    others = {world.random_scene(s).caption for s in range(8, 20)}
    assert len(others) > 10


@pytest.mark.parametrize("seed", range(20))
def test_caption_names_the_scene(seed):
    scene = world.random_scene(seed)
    objects, style, color = world.parse_caption(scene.caption)
    assert objects == [(o.color, o.shape) for o in scene.objects]
    assert (style, color) == (scene.background.style, scene.background.color)
    assert world.parse_caption(world.caption(scene, with_background=False)) == (objects, None, None)
    assert set(scene.caption.replace(",", "").split()) <= set(world.vocabulary())


def test_caption_grammar_and_bad_words():
    scene = world.Scene(
        (world.SceneObject("circle", "red", (0.1, 0.1, 0.4, 0.4)), world.SceneObject("star", "orange", (0.5, 0.5, 0.8, 0.8)),
         world.SceneObject("square", "blue", (0.1, 0.6, 0.3, 0.8))),
        world.Background("stripes", "yellow", (0.0, 0.2, 0.0)),
    )
    assert scene.caption == "a red circle, an orange star and a blue square on a striped yellow background"
    with pytest.raises(ValueError, match="caption names no"):
        world.parse_caption("a cat on a mat")
    with pytest.raises(ValueError, match="shape must be one of"):
        world.SceneObject("hexagon", "red", (0, 0, 0.5, 0.5))
    with pytest.raises(ValueError, match="background style"):
        world.random_scene(0, style="plaid")


@pytest.mark.parametrize("size", [128, 256])
def test_masks_boxes_and_pixels_agree(size):
    for seed in range(15):
        r = world.render(world.random_scene(seed), size)
        assert r.image.shape == (size, size, 3) and r.masks.shape == (len(r.scene.objects), size, size)
        assert (r.masks.sum(0) <= 1).all()  # visible masks do not overlap
        assert np.array_equal(r.background_mask, ~r.masks.any(0))
        for obj, mask, box, layout in zip(r.scene.objects, r.masks, r.boxes, r.layout_boxes):
            full = world.shape_mask(obj.shape, layout, (size, size))
            assert box == world.tight_box(mask) and (mask <= full).all()
            assert mask.sum() >= (1 - world.MAX_OCCLUDED - 0.02) * full.sum()  # checked at 128², so a little slack at 256²
            assert (r.image[mask] == world.COLORS[obj.color]).all()
        background = r.image[r.background_mask].astype(int)
        for rgb in world.COLORS.values():
            assert np.abs(background - rgb).sum(-1).min() > 60  # object colours never appear in the background


@pytest.mark.parametrize("style", list(world.STYLES))
def test_every_style_renders_and_is_recognised(style):
    for seed in range(4):
        r = world.render(world.random_scene(100 + seed, style=style))
        found = detect.detect(r.image)
        assert (found.style, found.background_color) == (style, r.background_color)


def _matches(rendered, found):
    """For each true object: (the detection overlapping it most or None, box IoU)."""
    out = []
    for mask, box in zip(rendered.masks, rendered.boxes):
        best = max(found.objects, key=lambda d: detect.mask_iou(d.mask, mask), default=None)
        out.append((best, detect.box_iou(best.box, box) if best else 0.0))
    return out


def test_detectors_are_exact_on_rendered_scenes():
    for seed in SEEDS:
        r = world.render(world.random_scene(seed))
        found = detect.detect(r.image)
        assert (found.style, found.background_color) == (r.style, r.background_color), seed
        assert len(found.objects) == len(r.scene.objects), seed
        for obj, (best, iou) in zip(r.scene.objects, _matches(r, found)):
            assert (best.color, best.shape) == (obj.color, obj.shape) and iou >= 0.9, (seed, obj, iou)


def test_detectors_degrade_gracefully_under_blur_and_noise():
    rng = np.random.default_rng(0)
    right, ious, styles = [], [], []
    for seed in range(40):
        r = world.render(world.random_scene(seed))
        blurred = ndimage.gaussian_filter(r.image.astype(float), sigma=(1, 1, 0)) + rng.normal(0, 8, r.image.shape)
        found = detect.detect(np.clip(np.round(blurred), 0, 255).astype(np.uint8))
        styles.append(found.style == r.style)
        for obj, (best, iou) in zip(r.scene.objects, _matches(r, found)):
            right.append(best is not None and (best.color, best.shape) == (obj.color, obj.shape))
            ious.append(iou)
    assert np.mean(right) >= 0.95 and np.mean(styles) >= 0.95 and np.mean(ious) >= 0.85


@pytest.mark.parametrize("shape", world.SHAPES)
def test_shapes_rounded_off_as_a_small_decoder_draws_them_keep_their_names(shape):
    # The demo VAE decodes from 1/8 resolution: a star's points and a cross's corners come out
    # rounded (as if opened by a disk) and the object's box shrinks with them.
    for seed in range(8):
        r = world.render(world.random_scene(seed, objects=[("blue", shape)]))
        light, dark = world.background_tones(r.background_color)
        bare = np.round(light + world.background_field(r.scene.background, 128)[..., None] * (dark - light))
        rounded = ndimage.binary_opening(r.masks[0], structure=detect._disk(2))
        image = np.where(rounded[..., None], r.image, bare).astype(np.uint8)
        found = detect.detect_objects(image)
        assert [(o.color, o.shape) for o in found] == [("blue", shape)], (seed, [(o.color, o.shape) for o in found])


def test_detector_inputs():
    r = world.render(world.random_scene(3))
    as_float = detect.detect(r.image.astype(np.float32)[None] / 255)  # a ComfyUI IMAGE batch of one
    assert [(o.color, o.shape) for o in as_float.objects] == [(o.color, o.shape) for o in detect.detect(r.image).objects]
    flood = np.zeros((128, 128, 3), np.uint8) + np.array(world.COLORS["red"], np.uint8)
    assert detect.detect_objects(flood) == []  # a colour filling the frame is no object
    with pytest.raises(ValueError, match="RGB"):
        detect.detect(np.zeros((128, 128)))
