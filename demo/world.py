"""A seeded procedural world of coloured shapes on styled backgrounds.

Every scene is 1-3 objects (a shape in a saturated colour, placed in a square
box, possibly overlapping a little) on a background of one style in two pale
tones of one hue. Rendering is exact (no anti-aliasing), so the truth of every
pixel is known: each scene comes with its caption, per-object visible masks,
their boxes and the background label.

The vocabulary below is also the prompt vocabulary of the demo model. Object
colours are saturated and background tones are pale, so a detector can tell
them apart even after a small VAE has blurred the image (see detect.py).

Coordinates: boxes are (x0, y0, x1, y1) with exclusive ends; in a `Scene` they
are fractions of the image side, in a `Rendered` they are pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star", "cross")

# Saturated object colours, far apart in RGB and from every background tone.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 40),
    "orange": (250, 130, 0),
    "yellow": (245, 215, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "black": (20, 20, 20),
}

# Background hues; each renders as two pale tones (see `background_tones`).
BACKGROUND_COLORS = ("red", "orange", "yellow", "green", "blue", "purple")

# style label -> the adjective the caption uses
STYLES: dict[str, str] = {
    "plain": "plain",
    "stripes": "striped",
    "dots": "dotted",
    "checks": "checkered",
    "gradient": "gradient",
    "texture": "textured",
}

DARK_TONE_MIX = 0.45  # the darker background tone: 45% of the hue, 55% white
LIGHT_TONE_MIX = 0.15  # the lighter one: 15% of the hue

MIN_SIZE, MAX_SIZE = 0.22, 0.42  # object box side, fraction of the image side
MARGIN = 0.03  # objects keep this far from the image border
MAX_OCCLUDED = 0.12  # at most this fraction of an object may be hidden by later ones
SAME_COLOR_GAP = 0.03  # same-coloured objects keep this far apart (else they would read as one)
TEXTURE_CELLS = 7  # the texture is bicubic noise on a 7x7 grid: blobs ~1/7 of the side
REFERENCE_SIZE = 128  # resolution at which placement constraints are checked
N_OBJECTS_WEIGHTS = (0.4, 0.35, 0.25)  # probabilities of 1, 2, 3 objects


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # fractions of the image side

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"object color must be one of {tuple(COLORS)}, got {self.color!r}")
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"box must be (x0, y0, x1, y1) inside [0, 1] with x0 < x1 and y0 < y1, got {self.box}")


@dataclass(frozen=True)
class Background:
    style: str
    color: str
    # Style parameters, fractions of the image side where lengths:
    # stripes (vertical 0/1, period, phase); dots (spacing, radius, phase x, phase y);
    # checks (cell, phase x, phase y); gradient (direction 0-3); texture (noise seed).
    params: tuple[float, ...] = ()

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"background style must be one of {tuple(STYLES)}, got {self.style!r}")
        if self.color not in BACKGROUND_COLORS:
            raise ValueError(f"background color must be one of {BACKGROUND_COLORS}, got {self.color!r}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in drawing order: later objects cover earlier ones
    background: Background

    @property
    def caption(self) -> str:
        return caption(self)


@dataclass
class Rendered:
    scene: Scene
    image: np.ndarray  # [H, W, 3] uint8
    masks: np.ndarray  # [objects, H, W] bool, the visible pixels of each object
    boxes: list[tuple[int, int, int, int]]  # tight boxes of the visible masks (COCO convention)
    layout_boxes: list[tuple[int, int, int, int]]  # the boxes the shapes were placed in
    caption: str
    style: str
    background_color: str
    background_mask: np.ndarray = field(repr=False, default=None)  # [H, W] bool: no object there


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, with_background: bool = True) -> str:
    """'a red circle and a blue square on a striped yellow background'."""
    items = [f"{article(o.color)} {o.color} {o.shape}" for o in scene.objects]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    if with_background:
        adjective = STYLES[scene.background.style]
        text += f" on {article(adjective)} {adjective} {scene.background.color} background"
    return text


_OBJECT_RE = re.compile(rf"\b(?:a|an) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")
_BACKGROUND_RE = re.compile(rf"\bon (?:a|an) ({'|'.join(STYLES.values())}) ({'|'.join(BACKGROUND_COLORS)}) background\b")


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """([(color, shape), ...], style label or None, background color or None) of a caption."""
    text = text.strip().lower()
    background = _BACKGROUND_RE.search(text)
    objects_part = text[: background.start()] if background else text
    objects = _OBJECT_RE.findall(objects_part)
    if not objects:
        raise ValueError(f"caption names no '<a|an> <color> <shape>' of this world: {text!r}")
    if background is None:
        return objects, None, None
    style = next(label for label, adjective in STYLES.items() if adjective == background.group(1))
    return objects, style, background.group(2)


# ----------------------------------------------------------------------------- shapes


def _star_polygon() -> np.ndarray:
    """A regular five-pointed star, stretched to fill [-1, 1]^2."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, np.sin(np.pi / 10) / np.sin(7 * np.pi / 10))
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    low, high = points.min(0), points.max(0)
    return (points - low) / (high - low) * 2 - 1


_STAR = _star_polygon()


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: a point is inside if a ray to +u crosses the boundary an odd number of times."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for (ua, va), (ub, vb) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (va > v) != (vb > v)
        u_cross = ua + (v - va) * (ub - ua) / np.where(vb == va, 1.0, vb - va)
        inside ^= crosses & (u < u_cross)
    return inside


def shape_template(shape: str, width: int, height: int) -> np.ndarray:
    """[height, width] bool: the shape filling a box of that size, sampled at pixel centres."""
    u = ((np.arange(width) + 0.5) / width * 2 - 1)[None, :]
    v = ((np.arange(height) + 0.5) / height * 2 - 1)[:, None]
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":  # apex up, base at the bottom
        return np.abs(u) <= (v + 1) / 2
    if shape == "cross":  # a plus sign with arms a third of the box wide
        return (np.abs(u) <= 1 / 3) | (np.abs(v) <= 1 / 3)
    if shape == "star":
        return _inside_polygon(u, v, _STAR)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def shape_mask(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """[H, W] bool: the shape placed in a pixel box of an image of `size` (H, W)."""
    x0, y0, x1, y1 = box
    mask = np.zeros(size, dtype=bool)
    mask[y0:y1, x0:x1] = shape_template(shape, x1 - x0, y1 - y0)
    return mask


def pixel_box(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    return tuple(int(round(c * size)) for c in box)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, of a mask's True pixels; (0, 0, 0, 0) if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


# ----------------------------------------------------------------------------- backgrounds


def background_tones(color: str) -> tuple[np.ndarray, np.ndarray]:
    """(light, dark) float RGB tones of a background hue: pale mixes of the hue with white."""
    hue = np.asarray(COLORS[color], dtype=np.float64)
    mix = lambda share: share * hue + (1 - share) * 255.0  # noqa: E731
    return mix(LIGHT_TONE_MIX), mix(DARK_TONE_MIX)


def background_field(background: Background, size: int) -> np.ndarray:
    """[size, size] in [0, 1]: the share of the dark tone at each pixel."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    x, y = x / size, y / size  # pixel centres as fractions of the side
    p = background.params
    style = background.style
    if style == "plain":
        return np.ones((size, size))
    if style == "stripes":
        vertical, period, phase = p
        coord = x if vertical else y
        return (((coord + phase) % period) < period / 2).astype(np.float64)
    if style == "dots":
        spacing, radius, phase_x, phase_y = p
        dx = (x + phase_x) % spacing - spacing / 2
        dy = (y + phase_y) % spacing - spacing / 2
        return (dx**2 + dy**2 <= radius**2).astype(np.float64)
    if style == "checks":
        cell, phase_x, phase_y = p
        return ((np.floor((x + phase_x) / cell) + np.floor((y + phase_y) / cell)) % 2).astype(np.float64)
    if style == "gradient":
        (direction,) = p
        return [y, 1 - y, x, 1 - x][int(direction)]
    if style == "texture":
        (noise_seed,) = p
        coarse = np.random.default_rng(int(noise_seed)).random((TEXTURE_CELLS, TEXTURE_CELLS)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float64)
        return (smooth - smooth.min()) / max(smooth.max() - smooth.min(), 1e-6)
    raise ValueError(f"background style must be one of {tuple(STYLES)}, got {style!r}")


def random_background(rng: np.random.Generator, style: str | None = None, color: str | None = None) -> Background:
    style = style or str(rng.choice(list(STYLES)))
    color = color or str(rng.choice(BACKGROUND_COLORS))
    # Periods of at least 1/8 of the side: 16 px at 128², two latent pixels of an 8x VAE.
    if style == "stripes":
        period = rng.uniform(0.125, 0.25)
        params = (float(rng.integers(2)), period, rng.uniform(0, period))
    elif style == "dots":
        spacing = rng.uniform(0.16, 0.25)
        params = (spacing, rng.uniform(0.22, 0.3) * spacing, rng.uniform(0, spacing), rng.uniform(0, spacing))
    elif style == "checks":
        cell = rng.uniform(0.125, 0.25)
        params = (cell, rng.uniform(0, cell), rng.uniform(0, cell))
    elif style == "gradient":
        params = (float(rng.integers(4)),)
    elif style == "texture":
        params = (float(rng.integers(2**31)),)
    else:
        params = ()
    return Background(style, color, tuple(float(v) for v in params))


# ----------------------------------------------------------------------------- scenes


def visible_masks(objects, size: int) -> np.ndarray:
    """[objects, size, size] bool: what each object shows once later objects are drawn over it."""
    masks = np.zeros((len(objects), size, size), dtype=bool)
    covered = np.zeros((size, size), dtype=bool)
    for i in reversed(range(len(objects))):
        full = shape_mask(objects[i].shape, pixel_box(objects[i].box, size), (size, size))
        masks[i] = full & ~covered
        covered |= full
    return masks


def _placement_ok(objects: list[SceneObject]) -> bool:
    size = REFERENCE_SIZE
    fulls = [shape_mask(o.shape, pixel_box(o.box, size), (size, size)) for o in objects]
    visible = visible_masks(objects, size)
    for full, seen in zip(fulls, visible):
        if seen.sum() < (1 - MAX_OCCLUDED) * full.sum():
            return False
    gap = int(np.ceil(SAME_COLOR_GAP * size))
    for i in range(len(objects)):
        for j in range(i):
            if objects[i].color != objects[j].color:
                continue
            a, b = pixel_box(objects[i].box, size), pixel_box(objects[j].box, size)
            if a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap:
                return False
    return True


def random_scene(
    seed: int,
    n_objects: int | None = None,
    objects: list[tuple[str, str]] | None = None,
    style: str | None = None,
    background_color: str | None = None,
) -> Scene:
    """A seeded scene. `objects` fixes the (color, shape) list (placement stays random);
    otherwise `n_objects` (default: 1-3 at random) distinct colour-shape pairs are drawn."""
    rng = np.random.default_rng(seed)
    if objects is None:
        count = n_objects or int(rng.choice([1, 2, 3], p=N_OBJECTS_WEIGHTS))
        if not 1 <= count <= 3:
            raise ValueError(f"n_objects must be 1, 2 or 3, got {n_objects}")
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        objects = [pairs[i] for i in rng.choice(len(pairs), size=count, replace=False)]
    for color, shape in objects:
        SceneObject(shape, color, (0, 0, 1, 1))  # validates the names
    background = random_background(rng, style, background_color)
    for _ in range(1000):
        placed = []
        for color, shape in objects:
            side = rng.uniform(MIN_SIZE, MAX_SIZE)
            x0, y0 = rng.uniform(MARGIN, 1 - MARGIN - side, size=2)
            placed.append(SceneObject(shape, color, (x0, y0, x0 + side, y0 + side)))
        if _placement_ok(placed):
            return Scene(tuple(placed), background)
    raise ValueError(f"could not place {objects} without hiding one (seed {seed})")


def render(scene: Scene, size: int = 128) -> Rendered:
    """Draw a scene at size x size pixels (128 to 256 is the intended range)."""
    if not 32 <= size <= 1024:
        raise ValueError(f"size must be between 32 and 1024 pixels, got {size}")
    light, dark = background_tones(scene.background.color)
    t = background_field(scene.background, size)[..., None]
    image = light + t * (dark - light)
    masks = visible_masks(scene.objects, size)
    for obj, mask in zip(scene.objects, masks):
        image[mask] = COLORS[obj.color]
    return Rendered(
        scene=scene,
        image=np.clip(np.round(image), 0, 255).astype(np.uint8),
        masks=masks,
        boxes=[tight_box(m) for m in masks],
        layout_boxes=[pixel_box(o.box, size) for o in scene.objects],
        caption=caption(scene),
        style=scene.background.style,
        background_color=scene.background.color,
        background_mask=~masks.any(0),
    )


def vocabulary() -> list[str]:
    """Every word a caption of this world can use."""
    words = {"a", "an", "and", "on", "background"} | set(COLORS) | set(SHAPES) | set(STYLES.values())
    return sorted(words)
