"""Detectors for the demo world: objects (colour, shape, mask, box) and background style.

Exact on rendered scenes and built to survive the blur and noise of a small
VAE on generated ones:
- every pixel goes to the nearest of the saturated object colours or of the
  pale background hues (a background hue is the segment between its two tones,
  so gradients and textures stay background);
- an object is a connected region of one colour that keeps a core after
  erosion (the blurred fringe between two colours is thin and has none);
- its shape is the template (world.shape_template in the region's box) that
  overlaps it best; pixels of other objects do not count, they may hide it.
  A decoder that works at 1/8 of the resolution rounds off a star's points and
  a cross's corners, and the region's box shrinks with them, so each template
  is also tried rounded (opened by a disk) and stretched to the region's box;
- the background style comes from how the dark-tone share `t` of the free
  background pixels varies: flat (plain), smooth and linear (gradient),
  smooth and not (texture), two-valued and constant along rows or columns
  (stripes), two-valued with a small dark share (dots) or a half share (checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import world

MIN_AREA = 0.004  # smallest object, as a share of the image (a star of side 0.22 covers ~0.017)
MAX_AREA = 0.3  # largest: the world's biggest square covers 0.42² ≈ 0.18; a colour flooding the image is no object
CORE_RADIUS = 2  # pixels at 128²: fringes thinner than twice this are not objects
# Pixels at 128²: how much a blurring decoder rounds a shape off. Without rounding, 86% of 140
# held-out single-object scenes reconstructed by the demo VAE were classified right (every miss a star read
# as a circle); with radii 2 and 3, 96%; exact renders stay at 100% (tests/test_demo_world.py).
ROUNDING_RADII = (0, 2, 3)
PLAIN_MAX_STD = 0.12  # t varies less than this on a plain background
MID_TONE_SHARE = 0.25  # smooth styles (gradient, texture) have at least this share of mid tones
GRADIENT_MIN_R2 = 0.85  # a gradient's t is this well explained by a plane
STRIPES_MIN_AXIS_SHARE = 0.75  # stripes: row (or column) means explain this share of t's variance
DOTS_MAX_DARK_SHARE = 0.36  # dots cover 15-28% of the background, checks 50%


@dataclass
class DetectedObject:
    color: str
    shape: str
    mask: np.ndarray  # [H, W] bool
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    shape_score: float  # IoU of the mask with the best template


@dataclass
class Detection:
    objects: list[DetectedObject]
    style: str | None  # None when too little background is visible to tell
    background_color: str | None


def as_uint8_rgb(image) -> np.ndarray:
    """[H, W, 3] uint8 from a uint8 array, a float array in [0, 1] (ComfyUI IMAGE) or a PIL image."""
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB (or [1, H, W, 3]), got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.round(np.asarray(array, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    return array


def box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray, ignore: np.ndarray | None = None) -> float:
    keep = np.ones_like(a, dtype=bool) if ignore is None else ~ignore
    union = ((a | b) & keep).sum()
    return float(((a & b) & keep).sum() / union) if union else 0.0


def _segment_distance(pixels: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of RGB pixels to the segment start-end, and the position t in [0, 1] along it."""
    direction = end - start
    t = np.clip(((pixels - start) @ direction) / (direction @ direction), 0, 1)
    return np.linalg.norm(pixels - (start + t[..., None] * direction), axis=-1), t


def classify_pixels(image: np.ndarray):
    """(label [H, W], t [H, W]): label k < len(COLORS) is object colour k, else background hue
    k - len(COLORS); t is the dark-tone share along the pixel's background hue."""
    pixels = image.astype(np.float64)
    distances, positions = [], []
    for rgb in world.COLORS.values():
        distances.append(np.linalg.norm(pixels - np.asarray(rgb, dtype=np.float64), axis=-1))
        positions.append(np.zeros(image.shape[:2]))
    for hue in world.BACKGROUND_COLORS:
        light, dark = world.background_tones(hue)
        d, t = _segment_distance(pixels, light, dark)
        distances.append(d)
        positions.append(t)
    label = np.argmin(np.stack(distances), axis=0)
    t = np.take_along_axis(np.stack(positions), label[None], axis=0)[0]
    return label, t


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x**2 + y**2 <= radius**2


def rounded_template(shape: str, width: int, height: int, radius: int) -> np.ndarray:
    """[height, width] bool: the shape opened by a disk of `radius` pixels (tips and corners
    rounded off, as a blurring decoder draws them), stretched so its tight box fills the array."""
    template = world.shape_template(shape, width, height)
    if radius == 0:
        return template
    pad = radius + 1
    opened = ndimage.binary_opening(np.pad(template, pad), structure=_disk(radius))[pad:-pad, pad:-pad]
    x0, y0, x1, y1 = world.tight_box(opened)
    if x1 - x0 < 2 or y1 - y0 < 2:  # too small to survive the rounding: only the exact template applies
        return template
    opened = opened[y0:y1, x0:x1]
    rows = np.arange(height) * opened.shape[0] // height
    cols = np.arange(width) * opened.shape[1] // width
    return opened[rows][:, cols]


def _classify_shape(mask: np.ndarray, box, others: np.ndarray) -> tuple[str, float]:
    """The template (exact or rounded) that best matches the mask in its box; other objects'
    pixels are ignored."""
    x0, y0, x1, y1 = box
    region, hidden = mask[y0:y1, x0:x1], others[y0:y1, x0:x1]
    radii = sorted({round(r * mask.shape[0] / 128) for r in ROUNDING_RADII})
    scores = {s: max(mask_iou(region, rounded_template(s, x1 - x0, y1 - y0, r), hidden) for r in radii)
              for s in world.SHAPES}
    best = max(scores, key=scores.get)
    return best, scores[best]


def detect_objects(image) -> list[DetectedObject]:
    """Every object in an RGB image, largest first."""
    image = as_uint8_rgb(image)
    label, _ = classify_pixels(image)
    return _objects_from_labels(label, image.shape[0])


def _objects_from_labels(label: np.ndarray, side: int) -> list[DetectedObject]:
    h, w = label.shape
    radius = max(1, round(CORE_RADIUS * side / 128))
    min_area = MIN_AREA * h * w
    found = []
    for index, color in enumerate(world.COLORS):
        pixels = label == index
        if not pixels.any():
            continue
        core = ndimage.binary_erosion(pixels, structure=_disk(radius))
        regions, count = ndimage.label(pixels)
        for region_id in range(1, count + 1):
            mask = regions == region_id
            if not min_area <= mask.sum() <= MAX_AREA * h * w or not (core & mask).any():
                continue
            found.append((color, mask))
    objects = []
    all_masks = np.zeros((h, w), dtype=bool)
    for _, mask in found:
        all_masks |= mask
    for color, mask in found:
        box = world.tight_box(mask)
        shape, score = _classify_shape(mask, box, all_masks & ~mask)
        objects.append(DetectedObject(color, shape, mask, box, score))
    return sorted(objects, key=lambda o: -o.mask.sum())


def _axis_share(t: np.ndarray, keep: np.ndarray, axis: int) -> float:
    """Share of t's variance (over kept pixels) explained by its means along one axis."""
    counts = keep.sum(axis)
    sums = (t * keep).sum(axis)
    lines = counts > 0
    means = sums[lines] / counts[lines]
    values = t[keep]
    total = values.var()
    if total == 0:
        return 0.0
    weights = counts[lines] / counts[lines].sum()
    return float((weights * (means - values.mean()) ** 2).sum() / total)


def _plane_r2(t: np.ndarray, keep: np.ndarray) -> float:
    y, x = np.nonzero(keep)
    values = t[keep]
    design = np.stack([np.ones_like(x), x, y], axis=1).astype(np.float64)
    coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
    residual = values - design @ coefficients
    total = ((values - values.mean()) ** 2).sum()
    return float(1 - (residual**2).sum() / total) if total > 0 else 0.0


def classify_style(t: np.ndarray, keep: np.ndarray) -> str | None:
    """The background style from the dark-tone share t on the free background pixels."""
    if keep.sum() < 0.1 * keep.size:
        return None
    values = t[keep]
    if values.std() < PLAIN_MAX_STD:
        return "plain"
    mid_share = ((values > 0.25) & (values < 0.75)).mean()
    if mid_share >= MID_TONE_SHARE:
        return "gradient" if _plane_r2(t, keep) >= GRADIENT_MIN_R2 else "texture"
    if max(_axis_share(t, keep, 0), _axis_share(t, keep, 1)) >= STRIPES_MIN_AXIS_SHARE:
        return "stripes"
    return "dots" if (values > 0.5).mean() <= DOTS_MAX_DARK_SHARE else "checks"


def detect(image) -> Detection:
    """Objects, background style and background hue of an RGB image."""
    image = as_uint8_rgb(image)
    label, t = classify_pixels(image)
    objects = _objects_from_labels(label, image.shape[0])
    n_colors = len(world.COLORS)
    background = label >= n_colors
    if not background.any():
        return Detection(objects, None, None)
    hue_index = np.bincount(label[background] - n_colors, minlength=len(world.BACKGROUND_COLORS)).argmax()
    hue = world.BACKGROUND_COLORS[hue_index]
    # Re-measure t on the winning hue everywhere, so blurred pixels nearer another hue still count.
    light, dark = world.background_tones(hue)
    _, t = _segment_distance(image.astype(np.float64), light, dark)
    occupied = np.zeros(label.shape, dtype=bool)
    for obj in objects:
        occupied |= obj.mask
    radius = max(1, round(CORE_RADIUS * image.shape[0] / 128))
    keep = background & ~ndimage.binary_dilation(occupied, structure=_disk(radius))
    return Detection(objects, classify_style(t, keep), hue)
