"""Quality of the demo model and of every technique on it, measured in the demo world.

    python benchmarks/quality.py            # the full table (CPU, 2 cores: see the printed timings)
    python benchmarks/quality.py --quick    # one or two prompts per row: a smoke run
    python benchmarks/quality.py --json     # the same figures as JSON, for machines

The world is synthetic, so the truth is known and the detectors of demo/detect.py
are pixel-exact: every figure is a count over fixed seeded prompt sets, at 128²
pixels, 20 steps (euler, normal, CFG 5 unless a paper says otherwise). Each
technique runs through the pack's own node (its Python entry point, as ComfyUI's
executor calls it) on the model DemoModelLoader loads (demo/weights/demo_model.safetensors
or $ATTENTION_LAB_DEMO_WEIGHTS), and is compared with the same graph without it.

Two-object outcomes (per prompt "a C1 S1 and a C2 S2", colours and shapes distinct;
"present" = an object of the subject's colour or shape among the detected objects
of the two prompted colours), first that applies:
  correct   both (C1, S1) and (C2, S2) detected;
  neglect   a subject is not present at all;
  fusion    both present, but in one object (colour of one, shape of the other);
  binding   two or more objects, and a swapped pair (C1, S2) or (C2, S1) detected;
  other     anything else (e.g. a wrong shape nobody asked for).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

HELD_OUT_SEED = 2**32  # demo/train.py never trains on world seeds from here on
SIZE = 128
OUTCOMES = ("correct", "neglect", "fusion", "binding", "other")
CROSS_IMAGE_NODE = "CrossImageAttention"
P2P_NODE = "PromptToPromptEdit"


@dataclass(frozen=True)
class Plan:
    steps: int = 20
    cfg: float = 5.0
    single_prompts: int = 35  # every colour-shape pair once
    two_object_prompts: int = 40
    vae_scenes: int = 32
    style_sets: int = 4  # batches of 4: a reference with a background, three prompts without
    photo_style_sets: int = 12  # the same, the reference a rendered scene (StyleAligned from a photo)
    bounded_prompts: int = 8
    segment_images: int = 12  # generated, and as many rendered
    inversion_scenes: int = 6
    cross_image_pairs: int = 8
    p2p_edits: int = 4  # per kind (colour swap, shape swap)
    p2p_real_edits: int = 4  # per kind, on rendered scenes through DDIMInvert
    pnp_scenes: int = 8  # Plug-and-Play translations of rendered scenes, against SDEdit


QUICK = Plan(single_prompts=2, two_object_prompts=2, vae_scenes=2, style_sets=1, photo_style_sets=1, bounded_prompts=1,
             segment_images=1, inversion_scenes=1, cross_image_pairs=1, p2p_edits=1, p2p_real_edits=1,
             pnp_scenes=1)


class Lab:
    """The loaded host, the pack's modules and the demo model, and the graph steps every measurement shares."""

    def __init__(self, host, plan: Plan):
        import comfy.utils
        import torch

        comfy.utils.PROGRESS_BAR_ENABLED = False
        self.torch = torch
        self.host, self.plan = host, plan
        self.nodes = host.nodes
        self.world, self.detect = host.module("demo.world"), host.module("demo.detect")
        self.weights = host.module("nodes.demo").weights_path()
        self.model, self.clip, self.vae = self.node("DemoModelLoader")

    def node(self, name: str, **inputs):
        """A node's outputs through its Python entry point, unset widgets at their schema defaults."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[name]
        defaults = {i.id: i.default for i in cls.define_schema().inputs
                    if getattr(i, "default", None) is not None and not i.optional}
        return cls.execute(**{**defaults, **inputs}).result

    def encode(self, texts: list[str]):
        """CLIPTextEncode of each text, stacked into one conditioning of batch len(texts)."""
        torch = self.torch
        encoded = [self.nodes.CLIPTextEncode().encode(self.clip, t)[0][0] for t in texts]
        cond = torch.cat([c for c, _ in encoded])
        pooled = torch.cat([extra["pooled_output"] for _, extra in encoded])
        return [[cond, {"pooled_output": pooled}]]

    def sample(self, model, texts: list[str], seed: int, cfg: float | None = None) -> dict:
        """KSampler's own code path (common_ksampler) on an empty 128² latent, one image per text."""
        latent = {"samples": self.torch.zeros(len(texts), 4, SIZE // 8, SIZE // 8)}
        return self.nodes.common_ksampler(model, seed, self.plan.steps, self.plan.cfg if cfg is None else cfg,
                                          "euler", "normal", self.encode(texts), self.encode([""] * len(texts)),
                                          latent)[0]

    def images(self, latent: dict):
        """[B, H, W, 3] float numpy in [0, 1], as VAEDecode gives them."""
        return self.vae.decode(latent["samples"]).float().cpu().numpy()

    def render(self, seed: int, **scene):
        return self.world.render(self.world.random_scene(seed, **scene), SIZE)

    def vae_latent(self, rendered: list) -> dict:
        pixels = self.torch.from_numpy(self._stack(rendered)).float() / 255
        return {"samples": self.vae.encode(pixels)}

    @staticmethod
    def _stack(rendered):
        import numpy as np

        return np.stack([r.image for r in rendered])


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return 10 * math.log10(1 / max(mse, 1e-10))


def mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 3) if values else None


def first_component_auc(features, grid: tuple[int, int], mask) -> float:
    """How well the first principal component (as SelfAttnPCA's `pca_rgb` orients it, bilinearly enlarged
    to the mask's size) tells the mask's pixels from the rest: ROC AUC, 1 = every masked pixel brighter,
    0.5 = chance, below 0.5 = the mask is the dark side."""
    import numpy as np
    import torch.nn.functional as F

    from attention_lab.attention_patches.segmentation import pca_rgb

    pc1 = pca_rgb(features, grid)[..., 0]
    big = F.interpolate(pc1[None, None], size=mask.shape, mode="bilinear", align_corners=False)[0, 0].numpy().ravel()
    inside = np.asarray(mask, dtype=bool).ravel()
    if inside.all() or not inside.any():
        raise ValueError("the mask must hold both object and background pixels")
    ranks = np.empty(len(big))
    ranks[np.argsort(big, kind="stable")] = np.arange(1, len(big) + 1)
    positives = int(inside.sum())
    return float((ranks[inside].sum() - positives * (positives + 1) / 2) / (positives * (len(big) - positives)))


def two_object_outcome(found: list[tuple[str, str]], subjects: list[tuple[str, str]]) -> str:
    """The outcome of a two-subject prompt from the detected (colour, shape) pairs (see the module doc)."""
    (c1, s1), (c2, s2) = subjects
    if (c1, s1) in found and (c2, s2) in found:
        return "correct"
    ours = [(c, s) for c, s in found if c in (c1, c2)]
    present = [any(c == color or s == shape for c, s in ours) for color, shape in subjects]
    if not all(present):
        return "neglect"
    if len(ours) == 1:
        return "fusion"
    if (c1, s2) in found or (c2, s1) in found:
        return "binding"
    return "other"


def pairs_in_order(world, count: int, seed: int) -> list[tuple[str, str]]:
    """`count` colour-shape pairs: every pair once in a seeded order, then again."""
    import numpy as np

    pairs = [(c, s) for c in world.COLORS for s in world.SHAPES]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[order[i % len(pairs)]] for i in range(count)]


def two_subjects(world, seed: int) -> list[tuple[str, str]]:
    """Two subjects with distinct colours and distinct shapes (so a swap is visible)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    colors = rng.choice(list(world.COLORS), size=2, replace=False)
    shapes = rng.choice(list(world.SHAPES), size=2, replace=False)
    return [(str(colors[0]), str(shapes[0])), (str(colors[1]), str(shapes[1]))]


def in_batches(items: list, size: int = 8):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ----------------------------------------------------------------------------- the model


def model_figures(lab: Lab) -> list[dict]:
    world, detect, plan = lab.world, lab.detect, lab.plan
    pairs = pairs_in_order(world, plan.single_prompts, seed=1)
    captions = [world.random_scene(HELD_OUT_SEED + 20_000 + i, objects=[p]).caption for i, p in enumerate(pairs)]
    hits = {"colour": 0, "shape": 0, "both": 0}
    for start, batch in enumerate(in_batches(list(zip(pairs, captions)))):
        images = lab.images(lab.sample(lab.model, [caption for _, caption in batch], seed=100 + start))
        for ((color, shape), _), image in zip(batch, images):
            found = detect.detect_objects(image)
            largest = found[0] if found else None
            hits["colour"] += bool(largest and largest.color == color)
            hits["shape"] += bool(largest and largest.shape == shape)
            hits["both"] += bool(largest and (largest.color, largest.shape) == (color, shape))
    rows = [{"section": "model", "metric": f"single-object fidelity ({key} of the largest object)",
             "value": round(hits[key] / len(pairs), 3), "baseline": None, "n": len(pairs)} for key in ("both", "colour", "shape")]

    subjects = [two_subjects(world, HELD_OUT_SEED + 30_000 + i) for i in range(plan.two_object_prompts)]
    captions = [world.random_scene(HELD_OUT_SEED + 30_000 + i, objects=s).caption for i, s in enumerate(subjects)]
    counts = dict.fromkeys(OUTCOMES, 0)
    for start, batch in enumerate(in_batches(list(zip(subjects, captions)))):
        images = lab.images(lab.sample(lab.model, [caption for _, caption in batch], seed=200 + start))
        for (pair, _), image in zip(batch, images):
            found = [(o.color, o.shape) for o in detect.detect_objects(image)]
            counts[two_object_outcome(found, pair)] += 1
    rows += [{"section": "model", "metric": f"two-object prompts: {outcome} rate", "value": round(counts[outcome] / len(subjects), 3),
              "baseline": None, "n": len(subjects)} for outcome in OUTCOMES]

    scenes = [lab.render(HELD_OUT_SEED + i) for i in range(plan.vae_scenes)]
    scores = [psnr(decoded, r.image / 255) for batch in in_batches(scenes)
              for decoded, r in zip(lab.images(lab.vae_latent(batch)), batch)]
    rows.append({"section": "model", "metric": "VAE reconstruction PSNR, held-out scenes (dB)", "value": round(mean(scores), 2),
                 "baseline": None, "n": len(scenes)})
    return rows


# ----------------------------------------------------------------------------- techniques


def style_aligned(lab: Lab) -> list[dict]:
    """A batch of 4: image 0 is prompted with a background, images 1-3 name only their object.
    With StyleAligned they should take image 0's background (style and hue) and keep their objects."""
    world, detect = lab.world, lab.detect
    styled = lab.node("SharedAttentionStyleAlign", model=lab.model)[0]
    tally = {name: {"style": [], "style_and_hue": [], "own_object": []} for name in ("with", "without")}
    for j in range(lab.plan.style_sets):
        pairs = pairs_in_order(world, 4, seed=40 + j)
        reference = world.random_scene(HELD_OUT_SEED + 40_000 + j, objects=[pairs[0]])
        texts = [reference.caption] + [f"{world.article(c)} {c} {s}" for c, s in pairs[1:]]
        for name, model in (("with", styled), ("without", lab.model)):
            found = [detect.detect(image) for image in lab.images(lab.sample(model, texts, seed=400 + j))]
            ref = found[0]
            for (color, shape), d in zip(pairs[1:], found[1:]):
                tally[name]["style"].append(d.style == ref.style)
                tally[name]["style_and_hue"].append((d.style, d.background_color) == (ref.style, ref.background_color))
                tally[name]["own_object"].append((color, shape) in [(o.color, o.shape) for o in d.objects])
    labels = {"style": "shares the reference's background style", "style_and_hue": "shares style and hue",
              "own_object": "keeps its own object"}
    return [{"section": "StyleAligned", "metric": f"set consistency: {labels[key]}", "value": mean(tally["with"][key]),
             "baseline": mean(tally["without"][key]), "n": len(tally["with"][key])} for key in labels]


# The settings of examples/style_aligned_from_photo.json: the paper's transfer recipe (DDIM inversion at CFG 2,
# the reference a tenth of the schedule ahead: offset 5 of 50 there, 2 of 20 here) with the adjustments for the
# 128 px demo model that StyleAlignedReferenceFromInversion's description explains: shared_score_scale 0.5 and
# shift 0 (the paper's setting for a reference whose content leaks), GroupNorm not shared, CFG 5.
PHOTO_STYLE = {"shared_score_scale": 0.5, "shared_score_shift": 0.0, "share_group_norm": "off"}
PHOTO_OFFSET = 2
PHOTO_INVERSION_CFG = 2.0


def style_aligned_from_photo(lab: Lab) -> list[dict]:
    """The reference is a rendered held-out scene (a "photo": one object on a styled background), DDIM-inverted
    with its caption; images 1-3 of the batch name only their object. With SharedAttentionStyleAlign and
    StyleAlignedReferenceFromInversion they should take the photo's background and keep their objects;
    the baseline is the same batch sampled unpatched."""
    world, detect, torch = lab.world, lab.detect, lab.torch
    styled = lab.node("SharedAttentionStyleAlign", model=lab.model, **PHOTO_STYLE)[0]
    tally = {name: {"style": [], "style_and_hue": [], "own_object": []} for name in ("with", "without")}
    for j in range(lab.plan.photo_style_sets):
        pairs = pairs_in_order(world, 4, seed=90 + j)
        photo = lab.render(HELD_OUT_SEED + 90_000 + j, objects=[pairs[0]])
        photo_prompt = lab.encode([photo.caption])
        _, inversion = lab.node("DDIMInvert", model=lab.model, latent=lab.vae_latent([photo]), positive=photo_prompt,
                                negative=lab.encode([""]), cfg=PHOTO_INVERSION_CFG, steps=lab.plan.steps)
        from_photo = lab.node("StyleAlignedReferenceFromInversion", model=styled, inversion=inversion,
                              reference_positive=photo_prompt, offset=PHOTO_OFFSET)[0]
        texts = [photo.caption] + [f"{world.article(c)} {c} {s}" for c, s in pairs[1:]]
        latent = {"samples": torch.zeros(len(texts), 4, SIZE // 8, SIZE // 8)}
        for name, model in (("with", from_photo), ("without", lab.model)):
            # the inversion's schedule (ddim_uniform), as the node asks
            out = lab.nodes.common_ksampler(model, 900 + j, lab.plan.steps, lab.plan.cfg, "euler", "ddim_uniform",
                                            lab.encode(texts), lab.encode([""] * len(texts)), latent)[0]
            for (color, shape), image in zip(pairs[1:], lab.images(out)[1:]):
                d = detect.detect(image)
                tally[name]["style"].append(d.style == photo.style)
                tally[name]["style_and_hue"].append((d.style, d.background_color) == (photo.style, photo.background_color))
                tally[name]["own_object"].append((color, shape) in [(o.color, o.shape) for o in d.objects])
    labels = {"style": "shares the photo's background style", "style_and_hue": "shares style and hue",
              "own_object": "keeps its own object"}
    return [{"section": "StyleAligned from a photo", "metric": f"images 1-3: {labels[key]}",
             "value": mean(tally["with"][key]), "baseline": mean(tally["without"][key]), "n": len(tally["with"][key])}
            for key in labels]


def distinct_subjects(world, seed: int, count: int) -> list[tuple[str, str]]:
    """`count` subjects with distinct colours and distinct shapes (two: `two_subjects`)."""
    import numpy as np

    if count == 2:
        return two_subjects(world, seed)
    rng = np.random.default_rng(seed)
    colors = rng.choice(list(world.COLORS), size=count, replace=False)
    shapes = rng.choice(list(world.SHAPES), size=count, replace=False)
    return [(str(c), str(s)) for c, s in zip(colors, shapes)]


def bounded_layouts(lab: Lab, count: int):
    """The held-out layouts of `count` subjects: (subjects, caption without background, the scene's boxes)."""
    world = lab.world
    for i in range(lab.plan.bounded_prompts):
        seed = HELD_OUT_SEED + 50_000 + 1_000 * (count - 2) + i
        subjects = distinct_subjects(world, seed, count)
        scene = world.random_scene(seed, objects=subjects)
        yield i, subjects, world.caption(scene, with_background=False), [list(o.box) for o in scene.objects]


# The examples' guidance settings: 6 guided steps, the paper's 15 of 50 as a share of 20 steps; a step size
# of 40 -> 10, five times the authors' SD1.5 value: on the 8 held-out two-subject layouts below, each subject
# in its box 0.06 (8 -> 2), 0.44 (20 -> 5), 0.56 (40 -> 10), 0.38 (80 -> 20); larger steps bend the shapes.
BOUNDED_SETTINGS = dict(guidance_steps=6, step_size_start=40.0, step_size_end=10.0)


def bounded_attention(lab: Lab) -> list[dict]:
    """Two and three subjects in the boxes of held-out layouts: is each subject drawn in its box
    (an object of its colour and shape whose box has IoU >= 0.5 with it), and the mean IoU.
    BoundedAttentionLayout as the examples set it (BOUNDED_SETTINGS)."""
    world, detect = lab.world, lab.detect
    rows = []
    for count in (2, 3):
        stats = {name: {"iou": [], "in_box": [], "all_in_box": [], "outcome": []} for name in ("with", "without")}
        for i, subjects, text, boxes in bounded_layouts(lab, count):
            bounded = lab.node("BoundedAttentionLayout", model=lab.model, clip=lab.clip, prompt=text,
                               subjects="\n".join(f"{c} {s}" for c, s in subjects), boxes=json.dumps(boxes),
                               width=SIZE, height=SIZE, **BOUNDED_SETTINGS)[0]
            targets = [world.pixel_box(box, SIZE) for box in boxes]
            for name, model in (("with", bounded), ("without", lab.model)):
                found = detect.detect_objects(lab.images(lab.sample(model, [text], seed=(500 if count == 2 else 800) + i))[0])
                hits = []
                for (color, shape), target in zip(subjects, targets):
                    ious = [detect.box_iou(o.box, target) for o in found if (o.color, o.shape) == (color, shape)]
                    stats[name]["iou"].append(max(ious, default=0.0))
                    hits.append(max(ious, default=0.0) >= 0.5)
                stats[name]["in_box"] += hits
                stats[name]["all_in_box"].append(all(hits))
                if count == 2:
                    stats[name]["outcome"].append(two_object_outcome([(o.color, o.shape) for o in found], subjects))
        label = {2: "two subjects", 3: "three subjects"}[count]
        row = lambda metric, key: {  # noqa: E731
            "section": "Bounded Attention", "metric": f"{label}: {metric}", "n": len(stats["with"][key]),
            "value": mean(stats["with"][key]), "baseline": mean(stats["without"][key])}
        rows += [row("each subject in its box (its colour and shape, box IoU >= 0.5)", "in_box"),
                 row("every subject of the prompt in its box", "all_in_box"),
                 row("mean box IoU of each subject (best object of its colour and shape)", "iou")]
        if count == 2:
            for outcome in OUTCOMES:
                rows.append({"section": "Bounded Attention", "metric": f"two subjects: {outcome} rate",
                             "value": mean(o == outcome for o in stats["with"]["outcome"]),
                             "baseline": mean(o == outcome for o in stats["without"]["outcome"]),
                             "n": len(stats["with"]["outcome"])})
    return rows


# the paper's widget values in tokens, as the nodes took them before they read layers by role: record up to
# 32², cluster the grid closest to 32², label with the one closest to 16² (on the demo model: 16², 16²)
ABSOLUTE_RESOLUTIONS = {"max_resolution": 32, "resolution": 32, "label_resolution": 16}


def segment_scores(lab: Lab, record, latent, text: str, truths: dict, absolute: bool) -> dict[str, list[float]]:
    """Per object (`truths`: shape noun -> true mask): IoU of SelfAttnSegment's word mask of its noun with
    its mask; IoU of the segment that fits it best whatever its label (the clustering alone); whether that
    segment is labelled with its noun. Per image: the AUC of SelfAttnPCA's first component against the
    union of the object masks. Per object too, the ceiling of any mask built from the cluster grid: its cells'
    true coverage of the object, bilinearly enlarged as SelfAttnSegment's smooth edges, above one half."""
    import numpy as np
    import torch.nn.functional as F

    grids = {k: v for k, v in ABSOLUTE_RESOLUTIONS.items() if k != "max_resolution"} if absolute else {}
    words = list(truths)
    segments, word_masks, labels = lab.node("SelfAttnSegment", record=record, clip=lab.clip, text=text,
                                            words=", ".join(words), latent=latent, **grids)[:3]
    segments = [s.cpu().numpy() > 0.5 for s in segments]
    label_of = [line.split(":")[1].split()[0] for line in labels.splitlines()]
    scores = {"labelled": [], "clustered": [], "label": [], "ceiling": [], "pca": []}
    for k, (word, truth) in enumerate(truths.items()):
        scores["labelled"].append(lab.detect.mask_iou(word_masks[k].cpu().numpy() > 0.5, truth))
        fits = [lab.detect.mask_iou(s, truth) for s in segments]
        best = max(range(len(fits)), key=fits.__getitem__)
        scores["clustered"].append(fits[best])
        scores["label"].append(label_of[best] == word)
    grid, self_maps = lab.host.module("nodes.segment").recorded_maps(
        record, "self", grids.get("resolution", 0), "quality")
    for truth in truths.values():
        coverage = F.adaptive_avg_pool2d(lab.torch.from_numpy(truth.astype(np.float32))[None, None], grid)
        enlarged = F.interpolate(coverage, size=truth.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        scores["ceiling"].append(lab.detect.mask_iou(enlarged > 0.5, truth))
    objects = np.any(list(truths.values()), axis=0)
    scores["pca"].append(first_component_auc(self_maps[0], grid, objects))
    return scores


def self_attn_segment(lab: Lab) -> list[dict]:
    """SelfAttnSegment, SelfAttnPCA and their recorders at their defaults (layers by role) against the same
    graph with the paper's resolutions in tokens (32², 32², 16²). Generated images: the truth of a shape noun is
    the detector's mask of the largest drawn object of that shape (its colour may be wrong: the word is the
    noun); rendered scenes (RecordAttentionPass): the world's masks."""
    world, detect = lab.world, lab.detect
    keys = ("labelled", "clustered", "label", "ceiling", "pca")
    tally = {(images, name): {k: [] for k in keys} for images in ("generated", "rendered") for name in ("with", "without")}
    for i in range(lab.plan.segment_images):
        subjects = two_subjects(world, HELD_OUT_SEED + 60_000 + i)
        scene = world.random_scene(HELD_OUT_SEED + 60_000 + i, objects=subjects)
        nouns = [shape for _, shape in subjects]
        real = world.render(scene, SIZE)
        positive = lab.encode([scene.caption])
        for name, absolute in (("with", False), ("without", True)):
            recording = {"max_resolution": ABSOLUTE_RESOLUTIONS["max_resolution"]} if absolute else {}
            recorded, record = lab.node("AttentionRecorder", model=lab.model, **recording)
            latent = lab.sample(recorded, [scene.caption], seed=600 + i)
            drawn = {}
            for o in sorted(detect.detect_objects(lab.images(latent)[0]), key=lambda o: o.mask.sum()):
                if o.shape in nouns:
                    drawn[o.shape] = o.mask
            if drawn:
                for k, v in segment_scores(lab, record, latent, scene.caption, drawn, absolute).items():
                    tally[("generated", name)][k] += v
            record, latent = lab.node("RecordAttentionPass", model=lab.model, positive=positive,
                                      latent=lab.vae_latent([real]), **recording)
            for k, v in segment_scores(lab, record, latent, scene.caption, dict(zip(nouns, real.masks)), absolute).items():
                tally[("rendered", name)][k] += v
    metrics = {"labelled": "mIoU of the word masks",
               "clustered": "mIoU of the best segment, label ignored",
               "label": "object's segment labelled with its noun",
               "ceiling": "ceiling: mIoU of the cluster grid's true cell coverage, enlarged",
               "pca": "SelfAttnPCA first component AUC against the objects"}
    rows = []
    for images in ("generated", "rendered"):
        for key, metric in metrics.items():
            with_, without = tally[(images, "with")][key], tally[(images, "without")][key]
            rows.append({"section": "SelfAttnSegment", "metric": f"{metric}, {images} (baseline: 32²/16² tokens)",
                         "value": mean(with_), "baseline": mean(without), "n": len(with_)})
    return rows


def ddim_inversion(lab: Lab) -> list[dict]:
    """Rendered held-out scenes, VAE-encoded, through DDIMInvert (the papers' 50 steps, ddim_uniform, cfg 1) and
    back through InversionReplay with the scene's caption; PSNR against the rendered pixels. The baseline is the
    VAE round trip alone, the ceiling of any latent-space reconstruction.

    ddim: the deterministic round trip (approximate: each step reuses the noise predicted for the next one).
    ddpm: edit-friendly DDPM inversion replayed with its stored noise maps: exact with the final residual (what
    reconstruction should use); without it (as edits replay) the model's last-step error shows."""
    scenes = [lab.render(HELD_OUT_SEED + 70_000 + i) for i in range(lab.plan.inversion_scenes)]
    latent = lab.vae_latent(scenes)
    positive = lab.encode([r.caption for r in scenes])
    truth = [r.image / 255 for r in scenes]
    vae = lab.images(latent)

    def replayed(inversion, add_final_residual: bool = True):
        return lab.images(lab.node("InversionReplay", model=lab.model, inversion=inversion, positive=positive,
                                   add_final_residual=add_final_residual)[0])

    def row(metric: str, images, against=truth, baseline=True) -> dict:
        return {"section": "DDIM inversion", "metric": metric,
                "value": round(mean(psnr(a, b) for a, b in zip(images, against)), 2),
                "baseline": round(mean(psnr(a, b) for a, b in zip(vae, truth)), 2) if baseline else None,
                "n": len(scenes)}

    ddim = lab.node("DDIMInvert", model=lab.model, latent=latent, positive=positive, method="ddim")[1]
    ddpm = lab.node("DDIMInvert", model=lab.model, latent=latent, positive=positive, method="ddpm")[1]
    ddim_images = replayed(ddim)
    return [
        row("PSNR of rendered scenes, DDIM inversion round trip (dB; baseline: VAE only)", ddim_images),
        row("PSNR of the DDIM round trip against the VAE's own reconstruction (dB)", ddim_images, vae, False),
        row("PSNR of rendered scenes, DDPM inversion replay, exact (dB; baseline: VAE only)", replayed(ddpm)),
        row("PSNR of rendered scenes, DDPM replay without the final residual, as edits run (dB; baseline: VAE only)",
            replayed(ddpm, add_final_residual=False)),
    ]


def cross_image_attention(lab: Lab) -> list[dict]:
    """A structure scene and an appearance scene with one object of the same shape, in other colours on other
    backgrounds; both prompted "a <shape>" (the node's template "a {}"), so colours and background can only come
    from the images. The output should keep the structure's object (same shape, mask IoU >= 0.6 with the
    structure's mask) and take the appearance's object colour and background colour; the node's two MASKs should
    each cover its image's object (IoU >= 0.5 with the world's true mask). Run at the node's defaults (the paper's)
    and with adain_background on (the example's setting). Baseline: the structure's own replay, same prompt."""
    world, detect = lab.world, lab.detect
    runs = {"defaults": {}, "adain_background": {"adain_background": True}}
    keys = ("kept", "colour", "background", "style", "structure_mask", "appearance_mask", "structure_mask_iou",
            "appearance_mask_iou")
    stats = {name: {key: [] for key in keys} for name in (*runs, "without")}
    for i in range(lab.plan.cross_image_pairs):
        seed = HELD_OUT_SEED + 80_000 + i
        (structure_colour, shape), (appearance_colour, _) = two_subjects(world, seed)
        structure = lab.render(seed, objects=[(structure_colour, shape)])
        appearance = lab.render(seed + 1, objects=[(appearance_colour, shape)])
        prompt = lab.encode([f"a {shape}"])
        # The paper inverts with edit-friendly DDPM at CFG 3.5.
        structure_inversion, appearance_inversion = (
            lab.node("DDIMInvert", model=lab.model, latent=lab.vae_latent([rendered]), positive=prompt,
                     negative=lab.encode([""]), method="ddpm", cfg=3.5)[1]
            for rendered in (structure, appearance))
        outputs = {}
        for name, extra in runs.items():
            latent, structure_mask, appearance_mask = lab.node(
                CROSS_IMAGE_NODE, model=lab.model, clip=lab.clip, structure=structure_inversion,
                appearance=appearance_inversion, structure_object=shape, appearance_object=shape, prompt="a {}", **extra)
            outputs[name] = latent
            for key, mask, truth in (("structure_mask", structure_mask, structure.masks[0]),
                                     ("appearance_mask", appearance_mask, appearance.masks[0])):
                iou = detect.mask_iou(mask[0].cpu().numpy() > 0.5, truth)
                stats[name][f"{key}_iou"].append(iou)
                stats[name][key].append(iou >= 0.5)
        outputs["without"] = lab.node("InversionReplay", model=lab.model, inversion=structure_inversion,
                                      positive=prompt, negative=lab.encode([""]), cfg=3.5)[0]
        for name, latent in outputs.items():
            found = detect.detect(lab.images(latent)[0])
            kept = [o for o in found.objects if o.shape == shape and detect.mask_iou(o.mask, structure.masks[0]) >= 0.6]
            stats[name]["kept"].append(bool(kept))
            stats[name]["colour"].append(any(o.color == appearance_colour for o in kept))
            stats[name]["background"].append(found.background_color == appearance.background_color)
            stats[name]["style"].append((found.style, found.background_color) == (appearance.style, appearance.background_color))
    labels = {"kept": "structure's object kept (shape, mask IoU >= 0.6)",
              "colour": "kept object takes the appearance colour",
              "background": "background takes the appearance hue",
              "style": "background takes the appearance style and hue",
              "structure_mask": "structure MASK IoU >= 0.5 with the true mask",
              "appearance_mask": "appearance MASK IoU >= 0.5 with the true mask",
              "structure_mask_iou": "structure MASK mean IoU",
              "appearance_mask_iou": "appearance MASK mean IoU"}
    rows = []
    for name in runs:
        for key, label in labels.items():
            masks_only = key.endswith(("mask", "mask_iou"))
            if masks_only and name != "defaults":
                continue  # the masks come from the same attention whatever AdaIN then does
            baseline = None if masks_only else mean(stats["without"][key])
            rows.append({"section": "Cross-Image Attention", "metric": label + ("" if name == "defaults" else f" ({name})"),
                         "value": mean(stats[name][key]), "baseline": baseline, "n": len(stats[name][key])})
    return rows


def p2p_sample(lab: Lab, guider, seed: int) -> dict:
    """SamplerCustomAdvanced's code path (RandomNoise, KSamplerSelect euler, BasicScheduler normal) on one
    empty 128² latent."""
    import comfy.sample
    import comfy.samplers

    latent = lab.torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    sigmas = comfy.samplers.calculate_sigmas(lab.model.get_model_object("model_sampling"), "normal", lab.plan.steps)
    samples = guider.sample(comfy.sample.prepare_noise(latent, seed), latent, comfy.samplers.sampler_object("euler"),
                            sigmas, disable_pbar=True, seed=seed)
    return {"samples": samples}


PROMPT_SWITCH = 0.4  # the prompt-switch baseline: the source prompt for this share of the steps, then the edit


def p2p_prompt_switch(lab: Lab, source: str, edited: str, seed: int) -> dict:
    """ComfyUI's prompt scheduling (ConditioningSetTimestepRange): the source prompt, then the edited one."""
    import comfy.sample
    import comfy.samplers
    import node_helpers

    set_range = node_helpers.conditioning_set_values
    first = set_range(lab.encode([source]), {"start_percent": 0.0, "end_percent": PROMPT_SWITCH})
    then = set_range(lab.encode([edited]), {"start_percent": PROMPT_SWITCH, "end_percent": 1.0})
    latent = {"samples": lab.torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    return lab.nodes.common_ksampler(lab.model, seed, lab.plan.steps, lab.plan.cfg, "euler", "normal", first + then,
                                     lab.encode([""]), latent)[0]


def p2p_edits(lab: Lab, kind: str) -> list[tuple[str, str, str, str, str]]:
    """(source prompt, edited prompt, changed word before, after, the object's shape after) per edit."""
    import numpy as np

    world = lab.world
    rng = np.random.default_rng(HELD_OUT_SEED % 1000 + (7 if kind == "colour" else 11))
    colours = [c for c in world.COLORS if c != "black"]
    edits = []
    for _ in range(lab.plan.p2p_edits):
        background = str(rng.choice([c for c in world.BACKGROUND_COLORS if c not in ("red", "blue", "green")]))
        style = str(rng.choice(["striped", "dotted", "plain"]))
        colour, new_colour = (str(c) for c in rng.choice([c for c in colours if c != background], 2, replace=False))
        shape, new_shape = (str(s) for s in rng.choice(world.SHAPES, 2, replace=False))
        if kind == "colour":
            new_shape = shape
        else:
            new_colour = colour
        template = "a {} {} on a {} {} background"
        edits.append((template.format(colour, shape, style, background),
                      template.format(new_colour, new_shape, style, background),
                      colour if kind == "colour" else shape, new_colour if kind == "colour" else new_shape, new_shape))
    return edits


def prompt_to_prompt(lab: Lab) -> list[dict]:
    """Colour swaps ("a red circle ..." -> "a blue circle ...") and shape swaps ("circle" -> "square") with
    PromptToPromptEdit (SamplerCustomAdvanced, euler, the plan's steps and CFG): edit success (the detector reads
    the edited object: new colour and shape), IoU of the edited object's box with the source's, PSNR outside
    both objects between source and edit. Settings: the authors' defaults; with local blend on the object's
    shape word(s) (threshold 0.8: the demo model's 16² word maps are diffuse, the background holds 40-60% of
    the peak, so the authors' 0.3 selects every pixel); and local blend with cross-attention replaced only in the
    first 20% of the steps. Baseline: the same seed with the edited prompt (what users do today); a second
    baseline, ComfyUI's prompt scheduling (source prompt for the first 40% of the steps, then the edit), has its
    own rows."""
    import numpy as np

    detect = lab.detect
    settings = {"defaults": {}, "local blend": {"blend_threshold": 0.8},
                "cross 0.2 + local blend": {"cross_replace_steps": 0.2, "blend_threshold": 0.8}}
    rows = []
    for kind in ("colour", "shape"):
        stats = {name: {"success": [], "iou": [], "psnr": []} for name in (*settings, "baseline", "prompt switch")}
        for i, (source, edited, old, new, new_shape) in enumerate(p2p_edits(lab, kind)):
            seed = HELD_OUT_SEED + 90_000 + i + (0 if kind == "colour" else 1000)
            outputs = {}
            for name, extra in settings.items():
                if "local blend" in name:  # the object's noun(s): the demo's colour words' maps are not localised
                    extra = {**extra, "blend_words": new_shape if kind == "colour" else f"{old}, {new}"}
                guider = lab.node(P2P_NODE, model=lab.model, clip=lab.clip, negative=lab.encode([""]),
                                  source_prompt=source, edit_prompts=edited, cfg=lab.plan.cfg, **extra)[0]
                outputs[name] = lab.images(p2p_sample(lab, guider, seed))
            source_image = outputs["defaults"][0]
            outputs["baseline"] = [source_image, lab.images(lab.sample(lab.model, [edited], seed))[0]]
            outputs["prompt switch"] = [source_image, lab.images(p2p_prompt_switch(lab, source, edited, seed))[0]]
            source_objects = detect.detect(source_image).objects
            for name, images in outputs.items():
                src, out = images[0], images[1]
                found = detect.detect(out).objects
                hit = [o for o in found if (o.color, o.shape) == (new if kind == "colour" else o.color, new_shape)
                       and (kind == "shape" or o.color == new)]
                stats[name]["success"].append(bool(hit))
                if hit and source_objects:
                    stats[name]["iou"].append(max(detect.box_iou(hit[0].box, s.box) for s in source_objects))
                outside = np.ones(src.shape[:2], bool)
                for o in found + detect.detect(src).objects:
                    outside &= ~o.mask
                if outside.any():
                    stats[name]["psnr"].append(psnr(src[outside], out[outside]))
        labels = {"success": f"{kind} swap: edit success (detector reads the edit)",
                  "iou": f"{kind} swap: edited object's box IoU with the source's",
                  "psnr": f"{kind} swap: PSNR outside the objects, edit vs source (dB)"}
        for name in (*settings, "prompt switch"):
            for key, label in labels.items():
                section = (f"Prompt-to-Prompt ({name})" if name in settings
                           else f"Prompt-to-Prompt baseline: {name} at {PROMPT_SWITCH:.0%}")
                rows.append({"section": section, "metric": label, "value": mean(stats[name][key]),
                             "baseline": mean(stats["baseline"][key]), "n": len(stats[name][key])})
    return rows


def edit_scores(lab: Lab, source_image, image, kind: str, new: str, new_shape: str, source_objects) -> tuple:
    """(the edit read by the detector, box IoU of the edited object with the source's, PSNR outside the objects)."""
    import numpy as np

    detect = lab.detect
    found = detect.detect(image).objects
    hit = [o for o in found if o.shape == new_shape and (kind == "shape" or o.color == new)]
    iou = max(detect.box_iou(hit[0].box, s.box) for s in source_objects) if hit and source_objects else None
    outside = np.ones(image.shape[:2], bool)
    for o in found + detect.detect(source_image).objects:
        outside &= ~o.mask
    return bool(hit), iou, (psnr(source_image[outside], image[outside]) if outside.any() else None)


def prompt_to_prompt_real(lab: Lab) -> list[dict]:
    """The same colour and shape swaps on rendered scenes (one object, the caption as the source prompt), VAE-encoded
    and inverted with DDIMInvert (edit-friendly DDPM, CFG 5, the plan's steps): PromptToPromptEditInversion at the
    authors' defaults and with cross-attention replacement off (self-attention injection only). Scores against
    the source branch (the reconstruction); IoU against the rendered object's box. Baseline: InversionReplay of the
    same inversion with the edited prompt (edit-friendly DDPM editing without attention control)."""
    p2p = lab.host.module("nodes.prompt_to_prompt")
    settings = {"defaults": {}, "cross 0": {"cross_replace_steps": 0.0}}
    negative = lab.encode([""])
    rows = []
    for kind in ("colour", "shape"):
        stats = {name: {"success": [], "iou": [], "psnr": []} for name in (*settings, "baseline")}
        for i, (source, edited, old, new, new_shape) in enumerate(p2p_edits(lab, kind)[:lab.plan.p2p_real_edits]):
            colour, shape = source.split()[1:3]
            style = {"striped": "stripes", "dotted": "dots", "plain": "plain"}[source.split()[5]]
            rendered = lab.render(HELD_OUT_SEED + 95_000 + i, objects=[(colour, shape)], style=style,
                                  background_color=source.split()[6])
            inversion = lab.node("DDIMInvert", model=lab.model, latent=lab.vae_latent([rendered]),
                                 positive=lab.encode([source]), negative=negative, cfg=lab.plan.cfg,
                                 steps=lab.plan.steps, scheduler="normal", method="ddpm")[1]
            truth_box = [type("Box", (), {"box": rendered.boxes[0]})()]
            outputs = {}
            for name, extra in settings.items():
                out = p2p.edit_inversion(lab.model, lab.clip, inversion, negative, source, [edited], lab.plan.cfg,
                                         **extra)
                outputs[name] = lab.images({"samples": out})
            replay = lab.node("InversionReplay", model=lab.model, inversion=inversion, positive=lab.encode([edited]),
                              negative=negative, cfg=lab.plan.cfg, add_final_residual=False)[0]
            outputs["baseline"] = [outputs["defaults"][0], lab.images(replay)[0]]
            for name, images in outputs.items():
                success, iou, value = edit_scores(lab, images[0], images[1], kind, new, new_shape, truth_box)
                stats[name]["success"].append(success)
                stats[name]["iou"] += [iou] if iou is not None else []
                stats[name]["psnr"] += [value] if value is not None else []
        labels = {"success": f"{kind} swap (real): edit success (detector reads the edit)",
                  "iou": f"{kind} swap (real): edited object's box IoU with the rendered object's",
                  "psnr": f"{kind} swap (real): PSNR outside the objects, edit vs reconstruction (dB)"}
        for name in settings:
            for key, label in labels.items():
                rows.append({"section": f"Prompt-to-Prompt, real ({name})", "metric": label,
                             "value": mean(stats[name][key]), "baseline": mean(stats["baseline"][key]),
                             "n": len(stats[name][key])})
    return rows


PNP_STEPS = 50  # the authors' DDIM steps, for the inversion and the translation
SDEDIT_STRENGTHS = (0.6, 0.75, 0.9)


def pnp_translations(lab: Lab, count: int) -> list[tuple[tuple, str, str, str, str]]:
    """(guidance scene, translation prompt, new object colour, new background colour, new style) per scene: one
    object on a plain background; the prompt changes the object's colour, the background's colour and its style
    to dotted. The first is the issue's example (red circle on plain blue -> green circle on dotted yellow)."""
    import numpy as np

    world = lab.world
    rng = np.random.default_rng(32)
    out = [(("red", "circle", "blue"), "green", "yellow")]
    colours = [c for c in world.COLORS if c != "black"]
    while len(out) < count:
        colour, new = rng.choice(colours, 2, replace=False)
        background, new_background = rng.choice(world.BACKGROUND_COLORS, 2, replace=False)
        if new_background == new or background == colour:
            continue  # an object of the background's hue would not read as an object
        out.append(((str(colour), str(rng.choice(world.SHAPES)), str(background)), str(new), str(new_background)))
    return [(scene, f"{world.article(new)} {new} {scene[1]} on a dotted {bg} background", new, bg, "dots")
            for scene, new, bg in out]


def translation_scores(lab: Lab, guidance, image, colour: str, background: str, style: str) -> dict:
    """Structure: IoU of the union of the detected object masks of the guidance and of the output. Appearance:
    the detector reads the prompt's object colour (on the object overlapping the guidance's most), background
    colour and background style."""
    import numpy as np

    detect = lab.detect
    before, after = detect.detect(guidance), detect.detect(image)
    union = lambda objects: np.any([o.mask for o in objects], axis=0) if objects else np.zeros(image.shape[:2], bool)  # noqa: E731
    guide_mask = union(before.objects)
    iou = detect.mask_iou(guide_mask, union(after.objects))
    best = max(after.objects, key=lambda o: (o.mask & guide_mask).sum(), default=None)
    return {"iou": iou, "colour": best is not None and best.color == colour,
            "background": after.background_color == background, "style": after.style == style}


def plug_and_play(lab: Lab, pictures: list | None = None) -> list[dict]:
    """Rendered one-object scenes on plain backgrounds, VAE-encoded and DDIM-inverted as the authors invert (an
    empty prompt, cfg 1, 50 steps), translated by PlugAndPlay (τ_f 0.8, τ_A 0.5) at the authors' guidance (cfg 7.5,
    their negative prompt) and at the demo model's (cfg 5, an empty negative, as every other row here). Baseline: the
    same graph with nothing injected (τ_f = τ_A = 0: plain DDIM sampling of the prompt from the inverted noise).
    SDEdit: img2img of the same latent (KSampler, euler, 50 steps, the prompt, cfg 5, an empty negative) at three
    denoise strengths. `pictures` (a list) receives (guidance, {setting: image}) per scene."""
    pnp = lab.host.module("nodes.plug_and_play")
    off = {"feature_steps": 0.0, "attention_steps": 0.0}
    demo = {"cfg": lab.plan.cfg, "negative_prompt": ""}
    settings = {"paper": {}, "paper, nothing injected": off, "demo": demo, "demo, nothing injected": {**demo, **off}}
    sections = {"paper": "Plug-and-Play, real (cfg 7.5, the authors' negative)",
                "demo": f"Plug-and-Play, real (cfg {lab.plan.cfg:g}, empty negative)"}
    keys = ("iou", "colour", "background", "style")
    methods = [*settings, *(f"SDEdit {s}" for s in SDEDIT_STRENGTHS)]
    stats = {m: {k: [] for k in keys} for m in methods}
    for i, ((colour, shape, background), prompt, new, new_background, style) in enumerate(
            pnp_translations(lab, lab.plan.pnp_scenes)):
        rendered = lab.render(HELD_OUT_SEED + 96_000 + i, objects=[(colour, shape)], style="plain",
                              background_color=background)
        latent = lab.vae_latent([rendered])
        inversion = lab.node("DDIMInvert", model=lab.model, latent=latent, positive=lab.encode([""]),
                             steps=PNP_STEPS, method="ddim")[1]
        images = {name: lab.images({"samples": pnp.translate(lab.model, lab.clip, inversion, [prompt],
                                                             steps=PNP_STEPS, **extra)})[0]
                  for name, extra in settings.items()}
        for strength in SDEDIT_STRENGTHS:
            out = lab.nodes.common_ksampler(lab.model, i, PNP_STEPS, lab.plan.cfg, "euler", "normal",
                                            lab.encode([prompt]), lab.encode([""]), latent, denoise=strength)[0]
            images[f"SDEdit {strength}"] = lab.images(out)[0]
        if pictures is not None:
            pictures.append((rendered.image / 255, images))
        for name, image in images.items():
            for key, value in translation_scores(lab, rendered.image / 255, image, new, new_background,
                                                 style).items():
                stats[name][key].append(value)
    labels = {"iou": "structure kept: object-mask IoU, output vs guidance",
              "colour": "appearance: the object has the prompt's colour", "background":
              "appearance: the background has the prompt's colour", "style": "appearance: the background is dotted"}
    rows = []
    for name in methods:
        if "nothing injected" in name:
            continue
        baseline = stats.get(f"{name}, nothing injected")
        for key, label in labels.items():
            rows.append({"section": sections.get(name, f"{name} (cfg {lab.plan.cfg:g})"), "metric": label,
                         "value": mean(stats[name][key]), "baseline": mean(baseline[key]) if baseline else None,
                         "n": len(stats[name][key])})
    return rows


MEASUREMENTS = [model_figures, style_aligned, style_aligned_from_photo, bounded_attention, self_attn_segment,
                ddim_inversion, cross_image_attention, prompt_to_prompt, prompt_to_prompt_real, plug_and_play]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one or two prompts per row: checks the whole run quickly")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()

    started, cpu_started = time.perf_counter(), time.process_time()
    host = _common.load_host()
    import torch

    lab = Lab(host, plan)
    rows, seconds = [], {}
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        for measure in MEASUREMENTS:
            start, cpu_start = time.perf_counter(), time.process_time()
            rows += measure(lab)
            seconds[measure.__name__] = round(time.perf_counter() - start, 1)
            # CPU time too: wall time means little on a machine other jobs share
            print(f"[{measure.__name__}] {seconds[measure.__name__]} s wall, "
                  f"{time.process_time() - cpu_start:.1f} s CPU", file=sys.stderr, flush=True)
    seconds["total"] = round(time.perf_counter() - started, 1)
    seconds["total_cpu"] = round(time.process_time() - cpu_started, 1)
    result = {"weights": str(lab.weights), "device": _common.device_name(), "plan": asdict(plan),
              "seconds": seconds, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"demo model {lab.weights}; {result['device']}; {plan.steps} steps, CFG {plan.cfg}, {SIZE}² px; "
              f"{seconds['total']} s wall, {seconds['total_cpu']} s CPU")
        print("value: with the technique (or the model's figure); baseline: the same graph without it")
        print(_common.table([{k: ("-" if v is None else v) for k, v in row.items()} for row in rows]))
    return result


if __name__ == "__main__":
    main()
