"""BoundedAttentionLayout: several subjects, each in its box (Bounded Attention, docs/methods.md §3).

The math is attention_patches/bounded.py. This adapter resolves the subjects to
token positions through the tokenizer that encoded the prompt, parses the boxes,
puts the masks on the router and, for guidance, wraps the model's conds batch
(`WrappersMP.CALC_COND_BATCH`): sampler-agnostic, on the clone this node owns.
Mask refinement adds the technique's attention recorder to the same router and
an `OUTER_SAMPLE` wrapper that starts every sampling run from the boxes.
"""

from __future__ import annotations

import json
import logging
import math
import sys

import torch

import comfy.patcher_extension
from comfy_api.latest import io

from ..attention_patches import bounded as ba
from ..attention_patches.schedule import step_index
from ..attention_patches.words import FILTER_CLASSES, is_function_word
from .patching import attach_router, model_family
from .tokens import phrase_tokens, tokenize

NODE = "BoundedAttentionLayout"
WRAPPER_KEY = "attention_lab.bounded_guidance"
RUN_WRAPPER_KEY = "attention_lab.bounded_run"
GUIDANCE_CHOICES = ["bounded", "layout_guidance", "attend_and_excite", "off"]
log = logging.getLogger("attention_lab")


# --- subjects and boxes -----------------------------------------------------------


def resolve_layout(clip, prompt: str, subjects: list[str], boxes: list, filter_words: bool) -> ba.BoundedLayout:
    """Token positions of every subject, EOS and the filter words in `prompt`'s first chunk, with the boxes.

    A subject must appear token for token; the filter words are the prompt's
    single-token words of the classes the authors' part-of-speech filter closes.
    """
    tokens = tokenize(clip, prompt, NODE)
    eos = tokens.end_position
    if eos is None:
        raise ValueError(f"{NODE}: clip: its tokenizer marks no end of the text; SD1.x/SD2.x/SDXL CLIP is needed")
    subject_tokens = tuple(phrase_tokens(clip, tokens, name, NODE, "subjects") for name in subjects)
    filters = ()
    if filter_words:
        filters = tuple(sorted(w.positions[0] for w in tokens.words
                               if len(w.positions) == 1 and w.positions[0] < eos
                               and is_function_word(w.text, FILTER_CLASSES)))
    return ba.BoundedLayout(boxes=tuple(boxes), subject_tokens=subject_tokens, eos_token=eos,
                            filter_tokens=filters, names=tuple(subjects))


def subject_lines(text: str) -> list[str]:
    """One subject per non-empty line, stripped."""
    return [s.strip() for s in text.splitlines() if s.strip()]


def parse_subjects(text: str) -> list[str]:
    subjects = subject_lines(text)
    if not subjects:
        raise ValueError(f"{NODE}: subjects: give one subject (a word or phrase of the prompt) per line")
    return subjects


def _is_box(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 4
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in entry))


def _box_entries(text: str, subjects: list[str], width: int, height: int) -> tuple[list, bool]:
    """The JSON's entries in subject order, pixel boxes divided by width/height; and whether they were pixels.

    JSON: a list in subject order, or an object {subject: box}. Pixel boxes: whole
    numbers, some above 1 (a fraction above 1 is a normalised box out of range).
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{NODE}: boxes: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); "
                         "expected [[x0, y0, x1, y1], ...] or {\"subject\": [x0, y0, x1, y1]}") from None
    if isinstance(data, dict):
        unknown = [k for k in data if k not in subjects]
        if unknown:
            raise ValueError(f"{NODE}: boxes: {unknown} are not among the subjects {subjects}")
        data = [data.get(s) for s in subjects]
    if not isinstance(data, list):
        raise ValueError(f"{NODE}: boxes: expected a JSON list of [x0, y0, x1, y1] boxes, got {type(data).__name__}")
    numbers = [c for b in data if _is_box(b) for c in b]
    pixels = any(c > 1 for c in numbers) and all(float(c).is_integer() for c in numbers)
    if pixels:
        data = [[b[0] / width, b[1] / height, b[2] / width, b[3] / height] if _is_box(b) else b for b in data]
    return data, pixels


def _checked_boxes(entries: list, pixels: bool, subjects: list[str], width: int, height: int,
                   allow_missing: bool) -> list:
    if len(entries) > len(subjects):
        raise ValueError(f"{NODE}: boxes: {len(entries)} boxes for {len(subjects)} subjects; give one box per subject line")
    missing = [s for s, b in zip(subjects, entries) if b is None] + subjects[len(entries):]
    if missing and not allow_missing:
        raise ValueError(f"{NODE}: boxes: no box for subject(s) {missing}; give one box per subject line")
    scale = f" (pixels of {width}x{height})" if pixels else ""
    return [None if box is None else ba.check_box(box, f"{NODE}: boxes: the box of {subject!r}{scale}")
            for subject, box in zip(subjects, entries)]


def parse_boxes(text: str, subjects: list[str], width: int, height: int) -> list[tuple]:
    """Boxes `[x0, y0, x1, y1]`, one per subject, normalised; pixel boxes (whole numbers, some > 1) are divided by width/height.

    JSON: a list in subject order, or an object {subject: box}.
    """
    entries, pixels = _box_entries(text, subjects, width, height)
    return _checked_boxes(entries, pixels, subjects, width, height, allow_missing=False)


def editor_view(subjects_text: str, boxes_text: str, width: int, height: int) -> dict:
    """What the box editor (web/bounded_boxes.js) draws, read by the parser the node runs.

    {"subjects": [...], "boxes": [box or None per entry] or None when the text is
    not a list of boxes, "problem": what this node would refuse, or ""}. A box that
    is not 4 numbers is None; one outside the image is shown clamped into it. A
    subject without a box is not a problem here: the editor asks for it by name.
    """
    subjects = subject_lines(subjects_text)
    try:
        entries, pixels = _box_entries(boxes_text, subjects, width, height)
    except ValueError as e:
        return {"subjects": subjects, "boxes": None, "problem": str(e).removeprefix(f"{NODE}: ")}
    problem = ""
    try:
        _checked_boxes(entries, pixels, subjects, width, height, allow_missing=True)
    except ValueError as e:
        problem = str(e).removeprefix(f"{NODE}: ")
    boxes = []
    for entry in entries:
        if not _is_box(entry) or not all(math.isfinite(c) for c in entry):
            boxes.append(None)
            continue
        x0, y0, x1, y1 = (min(1.0, max(0.0, float(c))) for c in entry)
        boxes.append([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)])
    return {"subjects": subjects, "boxes": boxes, "problem": problem}


EDITOR_ROUTE = "/attention_lab/box_editor"  # also in web/bounded_boxes.js
_routes_registered: set[int] = set()  # ids of the servers that serve EDITOR_ROUTE


def register_editor_route() -> None:
    """Serve `editor_view` to the box editor, on the running ComfyUI server (none in a headless host)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or id(instance) in _routes_registered:
        return
    _routes_registered.add(id(instance))
    from aiohttp import web

    @instance.routes.post(EDITOR_ROUTE)
    async def box_editor_view(request):
        try:
            body = await request.json()
            view = editor_view(str(body["subjects"]), str(body["boxes"]), max(1, int(body["width"])), max(1, int(body["height"])))
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": f"{NODE} box editor: bad request ({e})"}, status=400)
        return web.json_response(view)


# --- guidance inside sampling -----------------------------------------------------------


class BoundedGuidanceWrapper:
    """`calc_cond_batch` wrapper: at guided steps, optimise the latent, then predict every cond at it.

    Wrapping the batch of conds (not a single UNet call) gives one place per
    model evaluation that sees the positive prompt, whether ComfyUI then runs
    cond and uncond together or apart. Guidance passes run the positive cond
    only (the loss reads the conditional rows, as the authors' does).
    The latent is optimised in the UNet's input space z = c_in(σ)·x (the authors'
    latent), so η means what it means in their code: x ← x − η·∇_x L / c_in².
    The sampler keeps its own x; the returned predictions make its step the step
    from the guided latent (`sampler_consistent_denoised`).
    """

    def __init__(self, probe: ba.GuidanceProbe, ordinals: dict):
        self.probe = probe
        self.ordinals = ordinals
        self.losses: list[tuple[int, list[float]]] = []  # (step, normalised losses) of the current run

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, model, conds, x, timestep, model_options):
        schedule = model_options.get("transformer_options", {}).get("sample_sigmas")
        step = None if schedule is None else step_index(schedule, timestep, on_schedule=True)
        if not self.probe.guides(step) or conds[0] is None or step + 1 >= len(schedule):
            # not guided, no positive prompt (cfg 1 keeps it), or off the schedule: an intermediate
            # evaluation (Heun, DPM2, ...)
            return executor(model, conds, x, timestep, model_options)
        if step == 0:
            self.losses = []
        c_in = model.model_sampling.calculate_input(timestep, torch.ones_like(x))
        guided, losses = ba.guided_latent(
            lambda v: executor(model, conds[:1], v, timestep, model_options), self.probe, x, step, self.ordinals,
            preconditioner=1.0 / c_in ** 2,
        )
        self.losses.append((step, losses))
        log.info("[Attention Lab] %s: step %d, %s loss %s", NODE, step, self.probe.config.loss,
                 " -> ".join(f"{l:.3f}" for l in losses))
        guided = guided.to(x.dtype)
        sigma_next = float(schedule[step + 1])
        return [None if out is None else ba.sampler_consistent_denoised(out, x, guided, timestep, sigma_next)
                for out in executor(model, conds, guided, timestep, model_options)]


class MemoryCheck:
    """What the technique's own tensors need on a latent, and the refusal when that does not fit."""

    def __init__(self, probe: ba.GuidanceProbe | None, refinement: ba.MaskRefinement | None, family: str, heads,
                 device, dtype_bytes: int, loss_layers):
        self.probe, self.refinement, self.family, self.heads = probe, refinement, family, heads
        self.device, self.dtype_bytes = device, dtype_bytes
        self.loss_layers = loss_layers  # latent (h, w) -> the loss layers guidance reads on it

    def needed(self, latent: tuple[int, int], images: int) -> dict[str, int]:
        guided = self.probe is not None and self.probe.config.steps > 0
        return ba.memory_needed(
            latent, images, self.family, self.heads,
            loss_layers=self.loss_layers(latent) if guided else frozenset(),
            loss_kinds=self.probe.loss.kinds if guided else (),
            mask_layers=self.refinement.selection.layers if self.refinement is not None else frozenset(),
            dtype_bytes=self.dtype_bytes)

    def check(self, latent: tuple[int, int], images: int, where: str) -> None:
        """Refuse, naming `where` (the input to change) and the size that fits, when the tensors exceed free memory."""
        import comfy.model_management

        parts = self.needed(latent, images)
        available = comfy.model_management.get_free_memory(self.device)
        if sum(parts.values()) <= available:
            return
        fit = ba.largest_fitting_latent(latent, available, lambda l: sum(self.needed(l, images).values()))
        gib = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
        detail = ", ".join(f"{name} {gib(b)}" for name, b in parts.items() if b)
        fits = (f"at most {fit[1] * 8}x{fit[0] * 8} px fits" if fit else "no size fits")
        raise ValueError(
            f"{NODE}: {where}: a {latent[1] * 8}x{latent[0] * 8} px latent ({images} image(s)) needs about "
            f"{gib(sum(parts.values()))} for Bounded Attention's attention maps ({detail}), but {gib(available)} "
            f"is free on {self.device}; {fits}. Masks alone (guidance off, refine_masks off) need no N×N map.")


class BoundedRun:
    """OUTER_SAMPLE wrapper: every sampling run starts from the boxes with an empty record, after the
    memory its latent needs is checked (before the first UNet call), with the loss layers for its latent."""

    def __init__(self, probe: ba.GuidanceProbe | None, refinement: ba.MaskRefinement | None,
                 memory: MemoryCheck | None = None, loss_layers=None):
        self.probe = probe
        self.refinement = refinement
        self.memory = memory
        self.loss_layers = loss_layers  # latent (h, w) -> the loss layers for it (None: keep the probe's)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        noise = next((a for a in args if isinstance(a, torch.Tensor) and a.ndim == 4), None)
        if noise is not None and self.loss_layers is not None and self.probe is not None:
            self.probe.loss_layers = self.loss_layers(tuple(noise.shape[-2:]))
        if self.memory is not None and noise is not None:
            self.memory.check(tuple(noise.shape[-2:]), noise.shape[0], "the latent's size")
        if self.refinement is not None:
            self.refinement.begin_run()
        return executor(*args, **kwargs)


def _heads(model, family: str):
    """Attention heads of a layer, from the UNet's config (num_heads, or channels / num_head_channels)."""
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", {}) or {}
    channels, mults = config.get("model_channels", 320), config.get("channel_mult", [1, 2, 4, 4])
    num_heads, head_channels = config.get("num_heads", -1), config.get("num_head_channels", 64)

    def heads(layer) -> int:
        if num_heads and num_heads > 0:
            return int(num_heads)
        level = ba.DOWNSAMPLE[family][layer[0]][layer[1]].bit_length() - 1
        return max(1, channels * mults[min(level, len(mults) - 1)] // max(1, head_channels))

    return heads


# --- the node ----------------------------------------------------------------------------


def _apply(model, clip, prompt, subjects, boxes, width, height, guidance, guidance_steps, iterations_per_step,
           step_size_start, step_size_end, loss_threshold, cross_loss_scale, self_loss_scale, mask_eos, filter_words,
           refine_masks=True):
    if guidance not in GUIDANCE_CHOICES:
        raise ValueError(f"{NODE}: guidance: expected one of {', '.join(GUIDANCE_CHOICES)}, got {guidance!r}")
    subject_list = parse_subjects(subjects)
    box_list = parse_boxes(boxes, subject_list, width, height)
    layout = resolve_layout(clip, prompt, subject_list, box_list, filter_words)
    patched = model.clone()
    router = attach_router(patched, node=NODE)
    if any(isinstance(t, ba.BoundedAttention) for t in router.techniques):
        raise ValueError(f"{NODE}: model: this MODEL already passed through a {NODE} node; use one node with all subjects")
    try:
        family = ba.unet_family(router.layers)
    except ba.UnsupportedFamilyError as e:
        raise ValueError(f"{NODE}: model: unsupported model family ({model_family(model)}). {e}") from None
    config = None
    if guidance != "off":
        start, end = ba.STEP_SIZES[family]
        config = ba.GuidanceConfig(
            loss=guidance, steps=guidance_steps, iterations=iterations_per_step,
            step_size_start=step_size_start if step_size_start > 0 else start,
            step_size_end=step_size_end if step_size_end > 0 else end,
            loss_threshold=loss_threshold, cross_loss_scale=cross_loss_scale, self_loss_scale=self_loss_scale,
        )
    loss_layers = lambda latent: ba.loss_layers_for(family, latent, router.layers)  # noqa: E731
    initial_latent = (max(1, height // 8), max(1, width // 8))
    probe = ba.GuidanceProbe(layout, loss_layers(initial_latent), config) if config is not None else None
    refinement = (ba.MaskRefinement(layout, ba.MASK_LAYERS[family], ba.RefinementConfig(), guidance=probe)
                  if refine_masks else None)
    masks = router.add(ba.BoundedAttention(layout, mask_eos=mask_eos, guidance=probe, refinement=refinement))
    for technique in (probe, refinement):
        if technique is not None:
            router.add(technique)  # the probe right after the masks (same order): just inside them
    masks.inner_wants = _inner_wants(router, masks)
    dtype_bytes = torch.finfo(model.model.get_dtype()).bits // 8 if hasattr(model.model, "get_dtype") else 2
    memory = MemoryCheck(probe, refinement, family, _heads(model, family), model.load_device, dtype_bytes, loss_layers)
    memory.check(initial_latent, 1, "width/height")
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_KEY,
                                 BoundedRun(probe, refinement, memory, loss_layers))
    if probe is not None and guidance_steps > 0:
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                     BoundedGuidanceWrapper(probe, router.ordinal))
    return patched


def _inner_wants(router, technique: ba.BoundedAttention):
    """Whether a technique that runs inside `technique` on this router wants a call (it then needs the whole call)."""
    def wants(call) -> bool:
        techniques = router.techniques
        inner = techniques[techniques.index(technique) + 1:]
        return any(t.wants(call) for t in inner)

    return wants


class BoundedAttentionLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE,
            display_name="Bounded Attention Layout (Attention Lab)",
            category="attention_lab/layout",
            description=(
                "Bounded Attention (Dahary et al. 2024): several subjects of one prompt, each in its own box, "
                "without leaking into each other (no fused 'hybrids', no neglected subject). Masks cross- and "
                "self-attention between subjects in every layer and step, and in the first steps optimises the "
                "latent so each subject's attention stays in its box. SD1.x/SD2.x and SDXL."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (SD1.x, SD2.x or SDXL). The input MODEL is not changed."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the positive prompt: subjects are found through its tokenizer."),
                io.String.Input("prompt", multiline=True, default="a ginger kitten and a gray puppy in a yard",
                                tooltip="The positive prompt, exactly as given to CLIPTextEncode (token positions are read from it)."),
                io.String.Input("subjects", multiline=True, default="ginger kitten\ngray puppy",
                                tooltip="One subject per line: a word or phrase that appears verbatim in the prompt."),
                io.String.Input("boxes", multiline=True, default="[[0.05, 0.2, 0.45, 0.8], [0.55, 0.2, 0.95, 0.8]]",
                                tooltip="JSON: one box [x0, y0, x1, y1] per subject, in subject order (or {\"subject\": box}); "
                                        "origin top-left, normalised to [0, 1], or pixels of width x height. "
                                        "The box editor on the node writes this."),
                io.Int.Input("width", default=512, min=64, max=16384, step=8,
                             tooltip="Image width in pixels: scale of pixel boxes, and the box editor's aspect ratio."),
                io.Int.Input("height", default=512, min=64, max=16384, step=8,
                             tooltip="Image height in pixels: scale of pixel boxes, and the box editor's aspect ratio."),
                io.Combo.Input("guidance", options=GUIDANCE_CHOICES, default="bounded",
                               tooltip="Latent optimisation in the first steps. bounded: the paper's IoU loss on cross- and "
                                       "self-attention; layout_guidance / attend_and_excite: the baselines the paper compares "
                                       "with, on the same machinery; off: masks only (cheapest)."),
                io.Int.Input("guidance_steps", default=15, min=0, max=1000,
                             tooltip="Guidance runs at sampling steps i < this (paper: 15 of 50, i.e. the first 30%; "
                                     "for a 20-step run that share is 6)."),
                io.Int.Input("iterations_per_step", default=5, min=1, max=50,
                             tooltip="At most this many gradient steps on the latent per guided step (paper: 5)."),
                io.Float.Input("step_size_start", default=0.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="Step size η at step 0; 0 = the authors' value for the model (SD1.x 8, SDXL 18). "
                                       "The demo model's examples use 40 (measured best of 8, 20, 40, 80)."),
                io.Float.Input("step_size_end", default=0.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="Step size η reached at the last guided step (linear); 0 = the authors' value (SD1.x 2, SDXL 5). "
                                       "The demo model's examples use 10."),
                io.Float.Input("loss_threshold", default=0.2, min=0.0, max=10.0, step=0.01,
                               tooltip="A step's iterations stop once the loss per image and subject is below this (paper: 0.2)."),
                io.Float.Input("cross_loss_scale", default=1.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the cross-attention IoU term of the bounded loss (paper: 1.5)."),
                io.Float.Input("self_loss_scale", default=0.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the self-attention IoU term of the bounded loss (paper: 0.5)."),
                io.Boolean.Input("mask_eos", default=True,
                                 tooltip="Hide the end-of-text token from background pixels while denoising (paper: on); "
                                         "EOS carries the whole prompt and would paint subjects into the background."),
                io.Boolean.Input("filter_words", default=True,
                                 tooltip="Close the prompt's function words (a, the, and, in, numbers, left/right/top/bottom, ...) "
                                         "to every pixel, as the authors' part-of-speech filter does."),
                io.Boolean.Input("refine_masks", default=True,
                                 tooltip="From step 15 on (rebuilt every 5 steps), mask each subject by its shape instead of "
                                         "its box (paper: on): the self-attention maps are clustered (KMeans, 3 clusters per "
                                         "subject) and each cluster goes to the subject whose cross-attention covers it; a "
                                         "subject with no cluster keeps its box. Needs more than 15 steps to take effect; "
                                         "costs one attention map recording of the first decoder block."),
            ],
            outputs=[io.Model.Output(tooltip="The model with Bounded Attention; connect it to any sampler.")],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(_apply(**inputs))
