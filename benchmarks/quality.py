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
import importlib
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


@dataclass(frozen=True)
class Plan:
    steps: int = 20
    cfg: float = 5.0
    single_prompts: int = 35  # every colour-shape pair once
    two_object_prompts: int = 40
    vae_scenes: int = 32
    style_sets: int = 4  # batches of 4: a reference with a background, three prompts without
    bounded_prompts: int = 8
    segment_images: int = 6  # generated, and as many rendered
    inversion_scenes: int = 6
    cross_image_pairs: int = 4


QUICK = Plan(single_prompts=2, two_object_prompts=2, vae_scenes=2, style_sets=1, bounded_prompts=1,
             segment_images=1, inversion_scenes=1, cross_image_pairs=1)


class Lab:
    """The loaded host, the pack's modules and the demo model, and the graph steps every measurement shares."""

    def __init__(self, host, plan: Plan):
        import comfy.utils
        import torch

        comfy.utils.PROGRESS_BAR_ENABLED = False
        self.torch = torch
        self.host, self.plan = host, plan
        self.nodes = host.nodes
        module = lambda name: importlib.import_module(f"{host.pack.__name__}.{name}")  # noqa: E731
        self.world, self.detect = module("demo.world"), module("demo.detect")
        self.weights = module("nodes.demo").weights_path()
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


def segment_iou(lab: Lab, record, latent, text: str, shapes: list[str], truths) -> tuple[list[float], list[float]]:
    """Per object: IoU of its true mask with SelfAttnSegment's word mask of its shape noun, and with
    the segment that fits it best whatever its label (the clustering alone, before cross-attention
    labels it: a word below the threshold leaves its object's segment labelled background)."""
    words = ", ".join(shapes)
    segments, word_masks = lab.node("SelfAttnSegment", record=record, clip=lab.clip, text=text, words=words,
                                    latent=latent)[:2]
    segments = [s.cpu().numpy() > 0.5 for s in segments]
    labelled = [lab.detect.mask_iou(word_masks[k].cpu().numpy() > 0.5, truth) for k, truth in enumerate(truths)]
    clustered = [max(lab.detect.mask_iou(s, truth) for s in segments) for truth in truths]
    return labelled, clustered


def self_attn_segment(lab: Lab) -> list[dict]:
    """mIoU of SelfAttnSegment's word masks against the true masks: on generated images (truth: the
    detector's masks of the prompted objects, exact in this world) and on rendered scenes (RecordAttentionPass);
    for each, also the mIoU of the best-fitting segments, which tells clustering from labelling."""
    world, detect = lab.world, lab.detect
    generated, rendered, missing = ([], []), ([], []), 0
    for i in range(lab.plan.segment_images):
        subjects = two_subjects(world, HELD_OUT_SEED + 60_000 + i)
        scene = world.random_scene(HELD_OUT_SEED + 60_000 + i, objects=subjects)
        recorded, record = lab.node("AttentionRecorder", model=lab.model)
        latent = lab.sample(recorded, [scene.caption], seed=600 + i)
        found = {(o.color, o.shape): o.mask for o in detect.detect_objects(lab.images(latent)[0])}
        present = [pair for pair in subjects if pair in found]
        missing += len(subjects) - len(present)
        if present:
            for into, ious in zip(generated, segment_iou(lab, record, latent, scene.caption, [s for _, s in present],
                                                         [found[p] for p in present])):
                into += ious

        real = world.render(scene, SIZE)
        positive = lab.encode([scene.caption])
        record, latent = lab.node("RecordAttentionPass", model=lab.model, positive=positive, latent=lab.vae_latent([real]))
        for into, ious in zip(rendered, segment_iou(lab, record, latent, scene.caption, [s for _, s in subjects],
                                                    list(real.masks))):
            into += ious
    rows = []
    for images, detail, (labelled, clustered) in (
            ("generated images", f" (objects the model drew; {missing} not drawn)", generated),
            ("rendered scenes", " (RecordAttentionPass)", rendered)):
        rows += [
            {"section": "SelfAttnSegment", "metric": f"mIoU on {images}{detail}", "value": mean(labelled),
             "baseline": None, "n": len(labelled)},
            {"section": "SelfAttnSegment", "metric": f"mIoU on {images}: best segment, label ignored",
             "value": mean(clustered), "baseline": None, "n": len(clustered)},
        ]
    return rows


def ddim_inversion(lab: Lab) -> list[dict]:
    """Rendered held-out scenes through DDIMInvert → InversionReplay (the paper's w = 1, 50 steps);
    the baseline is the VAE round trip alone, the ceiling of any latent-space reconstruction."""
    scenes = [lab.render(HELD_OUT_SEED + 70_000 + i) for i in range(lab.plan.inversion_scenes)]
    latent = lab.vae_latent(scenes)
    positive = lab.encode([r.caption for r in scenes])
    _, inversion = lab.node("DDIMInvert", model=lab.model, latent=latent, positive=positive)
    replayed = lab.node("InversionReplay", model=lab.model, inversion=inversion, positive=positive)[0]
    truth = [r.image / 255 for r in scenes]
    return [{"section": "DDIM inversion", "metric": "reconstruction PSNR of rendered scenes (dB; baseline: VAE only)",
             "value": round(mean(psnr(a, b) for a, b in zip(lab.images(replayed), truth)), 2),
             "baseline": round(mean(psnr(a, b) for a, b in zip(lab.images(latent), truth)), 2), "n": len(scenes)}]


def cross_image_attention(lab: Lab) -> list[dict]:
    """A structure scene and an appearance scene with one object of the same shape, in other colours on other
    backgrounds; both prompted "a <shape>" (the node's template "a {}"), so colours and background can only come
    from the images. The output should keep the structure's object (same shape, mask IoU >= 0.5 with the
    structure's mask) and take the appearance's colour and background style and hue. Baseline: the structure's
    own replay with the same prompt."""
    if CROSS_IMAGE_NODE not in lab.nodes.NODE_CLASS_MAPPINGS:
        return [{"section": "Cross-Image Attention", "metric": "missing (issue 7)", "value": None, "baseline": None, "n": 0}]
    world, detect = lab.world, lab.detect
    stats = {name: {"kept": [], "colour": [], "style": []} for name in ("with", "without")}
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
        transferred = lab.node(CROSS_IMAGE_NODE, model=lab.model, clip=lab.clip, structure=structure_inversion,
                               appearance=appearance_inversion, structure_object=shape, appearance_object=shape,
                               prompt="a {}")[0]
        replay = lab.node("InversionReplay", model=lab.model, inversion=structure_inversion, positive=prompt,
                          negative=lab.encode([""]), cfg=3.5)[0]
        for name, latent in (("with", transferred), ("without", replay)):
            found = detect.detect(lab.images(latent)[0])
            kept = [o for o in found.objects if o.shape == shape and detect.mask_iou(o.mask, structure.masks[0]) >= 0.5]
            stats[name]["kept"].append(bool(kept))
            stats[name]["colour"].append(any(o.color == appearance_colour for o in kept))
            stats[name]["style"].append((found.style, found.background_color) == (appearance.style, appearance.background_color))
    labels = {"kept": "structure's object kept (shape, mask IoU >= 0.5)", "colour": "kept object takes the appearance colour",
              "style": "background takes the appearance style and hue"}
    return [{"section": "Cross-Image Attention", "metric": labels[key], "value": mean(stats["with"][key]),
             "baseline": mean(stats["without"][key]), "n": len(stats["with"][key])} for key in labels]


MEASUREMENTS = [model_figures, style_aligned, bounded_attention, self_attn_segment, ddim_inversion, cross_image_attention]


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
