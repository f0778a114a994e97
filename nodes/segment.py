"""Attention maps as nodes: record them while sampling, then segment, label, heat-map and PCA them.

`AttentionRecorder` puts the recorder (attention_patches/recorder.py) on a MODEL
clone and hands out the record (ATTENTION_RECORD); a sampler using that MODEL
fills it. The reading nodes take the record plus the sampler's LATENT output:
ComfyUI then runs them after the sampler, and the record is checked to belong
to that very result (a record refilled by another run, or one its selection left
empty, gives a clear error naming the cause instead of wrong masks). `RecordAttentionPass` makes a record of a
real image (VAEEncode output) with one noised model pass.

The math lives in attention_patches/segmentation.py; what lives here is the
ComfyUI side: the model pass and image/mask tensors in ComfyUI's layouts; prompt
words reach token positions through nodes/tokens.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import comfy.patcher_extension
import comfy.sample
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..attention_patches.recorder import CROSS, SELF, AttentionRecorder, RecordSelection, record_bytes
from ..attention_patches.segmentation import (
    describe_labels,
    fold_repeated_context,
    heat_overlay,
    kmeans_segments,
    label_segments,
    min_max,
    pca_rgb,
    segment_masks,
    segment_preview,
    segment_memberships,
    select_words,
    smooth_labels,
    upsample_labels,
    word_maps,
    word_masks,
)
from ..attention_patches.dit_recorder import DitAttentionRecorder
from .attention_maps_dit import add_dit_recorder
from .patching import attach_router, layer_downsampling, router_family
from .tokens import dit_prompt_words, prompt_words

AttentionRecord = io.Custom("ATTENTION_RECORD")

CATEGORY = "attention_lab/attention_maps"
VAE_SCALE = 8  # pixels per latent cell of SD1.x/SD2.x/SDXL VAEs
RUN_WRAPPER_KEY = "attention_lab.recorder"


GIB = 2**30


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"

MEMORY_SHARE = 0.8  # of the free memory a record may take: the model's own activations need the rest


def context_tokens(guider) -> int:
    """The longest text context among a sampler's conditionings (77 per CLIP chunk), 77 if none is found."""
    lengths = [c["cross_attn"].shape[1] for conds in (getattr(guider, "conds", None) or {}).values()
               for c in conds if isinstance(c, dict) and getattr(c.get("cross_attn"), "ndim", 0) == 3]
    return max(lengths, default=77)


def check_record_fits(recorder: AttentionRecorder, halvings: dict, latent_shape, keys: int, device, node: str) -> None:
    """Refuse, before any UNet call, a record that would not fit in the free memory of `device`.

    The record keeps one float32 map per recorded (kind, grid): a self-attention map is
    (H·W)² per image, so it grows with the fourth power of the image side (256x256 tokens:
    16 GiB per image). The message names the input and the largest max_resolution that fits.
    """
    import comfy.model_management

    images, latent = int(latent_shape[0]), (int(latent_shape[-2]), int(latent_shape[-1]))
    selection = recorder.selection
    need, maps = record_bytes(selection, halvings, latent, images, keys, recorder.chunk_elements)
    free = comfy.model_management.get_free_memory(device)
    if need <= MEMORY_SHARE * free:
        return
    fits = None
    for h, w in sorted({g for _, g in maps}, key=lambda g: -g[0] * g[1]):
        side = math.isqrt(h * w - 1) + 1  # the smallest max_resolution that admits an h x w grid
        smaller = replace(selection, max_tokens=side * side)
        if record_bytes(smaller, halvings, latent, images, keys, recorder.chunk_elements)[0] <= MEMORY_SHARE * free:
            fits = (side, record_bytes(smaller, halvings, latent, images, keys, recorder.chunk_elements)[0])
            break
    largest = max(maps, key=maps.get)
    setting = "0, auto" if selection.max_tokens is None else str(math.isqrt(selection.max_tokens))
    hint = (f"max_resolution {fits[0]} ({_size(fits[1])}) fits" if fits else
            "no max_resolution fits: use a smaller image or batch, or record fewer layers")
    raise ValueError(
        f"{node}: max_resolution: recording the {_grids({g for _, g in maps})} attention maps (max_resolution "
        f"{setting}) for {images} image(s) of "
        f"{latent[0] * VAE_SCALE}x{latent[1] * VAE_SCALE} px needs about {_size(need)} (the "
        f"{largest[1][0]}x{largest[1][1]} {largest[0]}-attention map alone {_size(maps[largest])}), more than "
        f"{MEMORY_SHARE:.0%} of the {_size(free)} free on {device}; {hint}."
    )


class RecordingRun:
    """OUTER_SAMPLE wrapper: a sampling run checks that its record fits, starts a fresh record and
    stamps it with its result."""

    def __init__(self, recorder: AttentionRecorder, halvings: dict | None = None, node: str = "AttentionRecorder"):
        self.recorder, self.halvings, self.node = recorder, halvings, node

    def __call__(self, executor, *args, **kwargs):
        if self.halvings is not None:
            guider = getattr(executor, "class_obj", None)
            device = getattr(getattr(guider, "model_patcher", None), "load_device", None)
            noise = args[0] if args else kwargs["noise"]
            check_record_fits(self.recorder, self.halvings, noise.shape, context_tokens(guider), device, self.node)
        self.recorder.begin_run()
        result = executor(*args, **kwargs)
        self.recorder.finish_run(result)
        return result

    def __deepcopy__(self, memo):
        return self  # model_options copies must keep pointing at the same record


def add_recorder(model, selection: RecordSelection, node: str):
    """A clone of `model` that records attention into a new recorder, and the recorder."""
    patched = model.clone()
    recorder = attach_router(patched, node=node).add(AttentionRecorder(selection))
    return patched, recorder


def record_selection(max_resolution: int, include_middle: bool, node: str, start: float = 0.0,
                     end: float = 1.0, halvings: dict | None = None) -> RecordSelection:
    """The recorder nodes' widgets as a RecordSelection: the paper's encoder and decoder blocks (and the
    middle one if asked), steps from start to end, and the layers max_resolution picks.

    max_resolution N > 0 keeps layers of at most N² tokens. 0 (auto, the default) applies the
    paper's rule by role instead of by token count: local-prompt-mixing stores layers of at most
    32² tokens of SD1.4 at 512 px, which is every attention level but the highest (64²). Auto keeps
    every encoder and decoder level below the highest (`halvings`: see patching.layer_downsampling):
    32² and 16² of SD1.5 at 512 px (the paper's), 32² of SDXL at 1024 px, 8² and 4² of the demo
    model at 128 px, whose 16² level is near-uniform attention (an object's tokens give their own
    object 1.1-2x the uniform share there, 5x at 8²), so a 32² limit would cluster noise.
    """
    blocks = frozenset({"input", "output", "middle"} if include_middle else {"input", "output"})
    try:
        if max_resolution == 0:
            top = min(h for layer, h in halvings.items() if layer[0] != "middle")
            layers = frozenset(layer for layer, h in halvings.items()
                               if (layer[0] != "middle" and h > top) or (layer[0] == "middle" and include_middle))
            if not any(layer[0] != "middle" for layer in layers):  # one attention level only: keep it
                layers = frozenset(layer for layer in halvings if layer[0] in blocks)
            return RecordSelection(layers=layers, max_tokens=None, start=start, end=end)
        return RecordSelection(blocks=blocks, max_tokens=max_resolution * max_resolution, start=start, end=end)
    except ValueError as error:
        raise _named(node, error) from error


def record_prompt_words(record: AttentionRecorder, clip, text: str, node: str):
    """prompt_words for the model the record was made on (Flux and SD3: their T5/CLIP layout)."""
    if isinstance(record, DitAttentionRecorder):
        return dit_prompt_words(clip, text, record.family, node)
    return prompt_words(clip, text, node)


def _named(node: str, error: ValueError) -> ValueError:
    """The error, prefixed with the node's name so the user sees which node to fix."""
    return ValueError(str(error) if str(error).startswith(node) else f"{node}: {error}")


def _grids(grids) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sorted(grids, key=lambda g: -g[0] * g[1]))


def check_record(record: AttentionRecorder, latent: dict | None, node: str) -> None:
    if record.is_empty and record.result is not None:
        skipped = {grid for _, grid in record.skipped}
        limit = record.selection.max_tokens
        if skipped and limit is not None and all(h * w > limit for h, w in skipped):
            smallest = min(skipped, key=lambda g: g[0] * g[1])
            raise ValueError(
                f"{node}: the attention record is empty: the sampling run recorded no layer, because the recorder's "
                f"max_resolution ({math.isqrt(limit)}) is below every attention grid of this model at this size "
                f"({_grids(skipped)}). Set the AttentionRecorder's (or RecordAttentionPass's) max_resolution to at "
                f"least {max(smallest)}."
            )
        raise ValueError(
            f"{node}: the attention record is empty: the sampling run recorded no layer; the recorder's selection "
            f"(blocks, max_resolution, start/end percent) left out every attention call it saw "
            f"({_grids(skipped) or 'none'}). Include the middle block, raise max_resolution or widen the step range."
        )
    if record.is_empty:
        raise ValueError(
            f"{node}: the attention record is empty: no sampling with the MODEL from its AttentionRecorder has run "
            "since the recorder was made. Sample with that MODEL and connect the sampler's LATENT output to this "
            "node's latent input, so that this node runs after the sampler."
        )
    if latent is not None and record.result is not None and not record.belongs_to(latent["samples"]):
        raise ValueError(
            f"{node}: latent: the attention record belongs to another sampling result than the LATENT connected here: "
            "the recorded MODEL was sampled again since (a second sampler, or a batch run that shares the recorder), "
            "or the LATENT comes from another sampler. Use one AttentionRecorder per sampler and connect that "
            "sampler's LATENT output."
        )


def image_size(record: AttentionRecorder, image, latent) -> tuple[int, int]:
    """Size of the masks: the image's if given, else the latent's × 8."""
    if image is not None:
        return int(image.shape[1]), int(image.shape[2])
    shape = latent["samples"].shape if latent is not None else (record.result.shape if record.result is not None else record.latent_shape)
    return int(shape[-2]) * VAE_SCALE, int(shape[-1]) * VAE_SCALE


def image_for(image, index: int, images: int, node: str):
    if image is None:
        return None
    if image.shape[0] not in (1, images):
        raise ValueError(f"{node}: image: {image.shape[0]} images for a record of {images}; give 1 or {images}")
    return image[index if image.shape[0] == images else 0]


def recorded_maps(record: AttentionRecorder, kind: str, side: int, node: str, self_grid=None):
    """The grid and mean maps of `kind` at the recorded grid closest to side² tokens; side 0 is auto:
    the largest recorded grid for self-attention, `AttentionRecorder.label_grid` for cross-attention."""
    try:
        if side:
            grid = record.closest_grid(kind, side)
        elif kind == SELF:
            grid = record.largest_grid(SELF)
        else:
            anchor = self_grid or (record.largest_grid(SELF) if record.grids(SELF) else record.largest_grid(CROSS))
            grid = record.label_grid(anchor)
        return grid, record.mean(kind, grid)
    except ValueError as error:
        raise _named(node, error) from error


MAX_RESOLUTION_TOOLTIP = (
    "0 (auto): the paper's layers by role, every encoder and decoder attention level but the highest (32² and 16² "
    "of SD1.5 at 512 px as in the paper, 32² of SDXL at 1024 px, 8² and 4² of the demo model at 128 px). N: layers "
    "of at most N² tokens. A self-attention map takes (tokens)² floats per image: the node refuses sizes that do "
    "not fit in memory before sampling."
)
AUTO_SELF_TOOLTIP = ("0 (auto): the largest recorded grid (the paper: 32², the largest its store keeps; the demo model "
                     "at 128 px: 8²). N: the recorded grid closest to N² tokens.")
AUTO_CROSS_TOOLTIP = ("0 (auto): the recorded grid one level below the self-attention grid, as the paper's 16² under 32², "
                      "unless that level has under 8 tokens a side (too coarse to place a word on an object; the demo "
                      "model's 4²), then the self-attention grid's own level. N: the recorded grid closest to N² tokens.")

EDGES = ("smooth", "cells")
EDGES_TOOLTIP = (
    "Where the masks' edges fall between attention tokens. smooth (the pack's): each token's self-attention row "
    "is unmixed into the segments' mean rows, and those shares, bilinearly enlarged, decide each pixel, so an edge "
    "can cross a token's cell (an object a few tokens wide keeps its shape). cells (the paper's): every token's "
    "cell is repeated, edges on the token grid. Labels and scores are the same either way."
)


WORDS_TOOLTIP = (
    "Prompt words, comma-separated (an entry may hold several words: 'red car'). Empty: every word of the prompt "
    "except function words (a, the, of, with, ...). Every occurrence of a word counts; multi-token words are merged."
)
CLIP_TOOLTIP = "The CLIP that encoded the positive prompt: its tokenizer maps the prompt's words to token positions."
TEXT_TOOLTIP = "The positive prompt exactly as encoded for the sampler (the recorded cross-attention's tokens)."
LATENT_TOOLTIP = (
    "The LATENT output of the sampler that used the recorded MODEL: makes this node run after it and checks that "
    "the record belongs to that result."
)


class AttentionRecorderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttentionRecorder",
            display_name="Attention Recorder (Attention Lab)",
            category=CATEGORY,
            description=(
                "Records the UNet's attention maps while a sampler runs the returned MODEL: running means over "
                "steps, layers and heads of the self-attention (HW x HW) and cross-attention (HW x prompt tokens) "
                "maps of the conditional pass, one map per resolution. Sampling results are unchanged. Feed the "
                "record to SelfAttnSegment, CrossAttnHeatmap or SelfAttnPCA together with the sampler's LATENT."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (SD1.x, SD2.x, SDXL; Flux and SD3: every "
                                                "joint block at the model's one token grid, image queries to image "
                                                "and to text keys)."),
                io.Int.Input("max_resolution", default=0, min=0, max=256, tooltip=MAX_RESOLUTION_TOOLTIP),
                io.Boolean.Input(
                    "include_middle", default=False,
                    tooltip="Also record the middle block. The paper averages the encoder (down) and decoder (up) blocks "
                            "only. On Flux and SD3 (no middle block) every block is recorded.",
                ),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First recorded step, as a fraction of the schedule (the paper: every step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Last recorded step, as a fraction of the schedule."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the recorder; connect it to the sampler."),
                AttentionRecord.Output(display_name="record", tooltip="The record the sampler fills; read it after the sampler."),
            ],
        )

    @classmethod
    def execute(cls, model, max_resolution, include_middle, start_percent, end_percent) -> io.NodeOutput:
        family = router_family(model)
        if family in ("flux", "sd3"):  # include_middle names a UNet block: a DiT records every block
            patched, recorder, halvings = add_dit_recorder(model, family, max_resolution, start_percent,
                                                           end_percent, "AttentionRecorder")
            run = RecordingRun(recorder, halvings, "AttentionRecorder")
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_KEY, run)
            return io.NodeOutput(patched, recorder)
        halvings = layer_downsampling(model, "AttentionRecorder")
        selection = record_selection(max_resolution, include_middle, "AttentionRecorder", start_percent, end_percent,
                                     halvings)
        patched, recorder = add_recorder(model, selection, node="AttentionRecorder")
        run = RecordingRun(recorder, halvings, "AttentionRecorder")
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_KEY, run)
        return io.NodeOutput(patched, recorder)


class RecordAttentionPass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RecordAttentionPass",
            display_name="Record Attention of an Image (Attention Lab)",
            category=CATEGORY,
            description=(
                "Records the attention maps of an existing image (VAEEncode output): noises the latent to the given "
                "strength and runs one conditional model pass with the prompt, recording it like AttentionRecorder. "
                "A light stand-in for the paper's inversion; to average over a whole trajectory, invert the image "
                "and sample it back with AttentionRecorder instead."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model (SD1.x, SD2.x, SDXL)."),
                io.Conditioning.Input("positive", tooltip="The prompt describing the image."),
                io.Latent.Input("latent", tooltip="The image's latent, from VAEEncode."),
                io.Float.Input("strength", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="Noise level of the pass as a fraction of the schedule (1 = pure noise). "
                                       "Low keeps the maps on the image's exact layout; high gives the model more say."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, tooltip="Seed of the added noise."),
                io.Int.Input("max_resolution", default=0, min=0, max=256, tooltip=MAX_RESOLUTION_TOOLTIP),
                io.Boolean.Input("include_middle", default=False,
                                 tooltip="Also record the middle block (the paper: encoder and decoder blocks only)."),
            ],
            outputs=[
                AttentionRecord.Output(display_name="record", tooltip="The record of the pass."),
                io.Latent.Output(tooltip="The input latent, unchanged: connect it to the reading node's latent input."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, strength, seed, max_resolution, include_middle) -> io.NodeOutput:
        halvings = layer_downsampling(model, "RecordAttentionPass")
        selection = record_selection(max_resolution, include_middle, "RecordAttentionPass", halvings=halvings)
        patched, recorder = add_recorder(model, selection, node="RecordAttentionPass")
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        keys = max((c[0].shape[1] for c in positive), default=77)
        check_record_fits(recorder, halvings, samples.shape, keys,
                          model.load_device, "RecordAttentionPass")
        sigma = float(model.get_model_object("model_sampling").percent_to_sigma(1.0 - strength))
        noise = comfy.sample.prepare_noise(samples, seed)
        # One Euler step from sigma to 0 is one model call; cfg 1 makes it the conditional pass alone.
        comfy.sample.sample(patched, noise, 1, 1.0, "euler", "normal", positive, positive, samples,
                            sigmas=torch.tensor([sigma, 0.0]), disable_pbar=True, seed=seed)
        recorder.finish_run(latent["samples"])
        return io.NodeOutput(recorder, latent)


class SelfAttnSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfAttnSegment",
            display_name="Self-Attention Segment (Attention Lab)",
            category=CATEGORY,
            description=(
                "Cuts the image into labelled segments from its attention maps (local-prompt-mixing): KMeans on the "
                "rows of the averaged self-attention map, each segment labelled with the prompt word whose "
                "normalised cross-attention is highest on it, or background below the threshold. Grids are picked "
                "by role (0 = auto): the paper's 32² clusters and 16² labels on SD1.5 at 512 px, 8² and 8² on the "
                "demo model at 128 px. Unlike the paper, the masks' edges may cross the token grid by default (edges)."
            ),
            inputs=[
                AttentionRecord.Input("record", tooltip="From AttentionRecorder (after sampling) or RecordAttentionPass."),
                io.Clip.Input("clip", tooltip=CLIP_TOOLTIP),
                io.String.Input("text", multiline=True, tooltip=TEXT_TOOLTIP),
                io.String.Input("words", default="", tooltip=WORDS_TOOLTIP + " These are the candidate labels and the word "
                                "masks. The paper offers the prompt's nouns: name the objects ('circle, square'); a "
                                "segment no word scores above the threshold is background anyway."),
                io.Int.Input("segments", default=5, min=1, max=64, tooltip="Number of KMeans clusters (the paper: 5)."),
                io.Int.Input("resolution", default=0, min=0, max=256,
                             tooltip="Self-attention grid to cluster. " + AUTO_SELF_TOOLTIP),
                io.Int.Input("label_resolution", default=0, min=0, max=256,
                             tooltip="Cross-attention grid that labels the segments. " + AUTO_CROSS_TOOLTIP),
                io.Float.Input("threshold", default=0.35, min=0.0, max=1.0, step=0.01,
                               tooltip="A segment whose best word scores at most this is background (the paper: 0.35)."),
                io.Int.Input("seed", default=1, min=0, max=2**31 - 1, tooltip="KMeans seed (the paper: 1); n_init is 10."),
                io.Combo.Input("edges", options=list(EDGES), default="smooth", tooltip=EDGES_TOOLTIP),
                io.Latent.Input("latent", optional=True, tooltip=LATENT_TOOLTIP),
                io.Image.Input("image", optional=True,
                               tooltip="The decoded image: the preview is drawn over it and the masks take its size "
                                       "(without it: the latent's size × 8)."),
            ],
            outputs=[
                io.Mask.Output(display_name="segments", tooltip="One mask per segment (per image, in order); they partition the image."),
                io.Mask.Output(display_name="word_masks", tooltip="One mask per word (per image): the union of the segments labelled with it."),
                io.String.Output(display_name="labels", tooltip="Each segment's label and every word's score on it."),
                io.Image.Output(display_name="preview", tooltip="The segments in colour with their labels."),
            ],
        )

    @classmethod
    def execute(cls, record, clip, text, words, segments, resolution, label_resolution, threshold, seed,
                latent=None, image=None, edges="smooth") -> io.NodeOutput:
        node = "SelfAttnSegment"
        if edges not in EDGES:
            raise ValueError(f"{node}: edges: expected one of {', '.join(EDGES)}, got {edges!r}")
        check_record(record, latent, node)
        try:
            prompt, prompt_tokens = record_prompt_words(record, clip, text, node)
            chosen = select_words(prompt, words)
        except ValueError as error:
            raise _named(node, error) from error
        self_grid, self_maps = recorded_maps(record, SELF, resolution, node)
        cross_grid, cross_maps = recorded_maps(record, CROSS, label_resolution, node, self_grid)
        size = image_size(record, image, latent)
        all_masks, all_word_masks, texts, previews = [], [], [], []
        try:
            cross_maps = fold_repeated_context(cross_maps, prompt_tokens)
            for index in range(self_maps.shape[0]):
                labels = kmeans_segments(self_maps[index], self_grid, segments, seed)
                segment_labels = label_segments(labels, word_maps(cross_maps[index], cross_grid, chosen), threshold)
                if edges == "smooth":
                    big = smooth_labels(segment_memberships(self_maps[index], labels), size)
                else:
                    big = upsample_labels(labels, size)
                masks = segment_masks(labels, size, big)
                all_masks.append(masks)
                all_word_masks.append(word_masks(masks, segment_labels, list(chosen)))
                header = f"image {index}:\n" if self_maps.shape[0] > 1 else ""
                texts.append(header + describe_labels(segment_labels))
                previews.append(segment_preview(big, segment_labels,
                                                image_for(image, index, self_maps.shape[0], node)))
        except ValueError as error:
            raise _named(node, error) from error
        return io.NodeOutput(torch.cat(all_masks), torch.cat(all_word_masks), "\n".join(texts), torch.stack(previews))


class CrossAttnHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CrossAttnHeatmap",
            display_name="Cross-Attention Heat Map (Attention Lab)",
            category=CATEGORY,
            description=(
                "Shows where each prompt word fed the image: its cross-attention map (averaged over the recorded "
                "steps, layers and heads; a multi-token word's tokens summed) over the decoded image."
            ),
            inputs=[
                AttentionRecord.Input("record", tooltip="From AttentionRecorder (after sampling) or RecordAttentionPass."),
                io.Clip.Input("clip", tooltip=CLIP_TOOLTIP),
                io.String.Input("text", multiline=True, tooltip=TEXT_TOOLTIP),
                io.String.Input("words", default="", tooltip=WORDS_TOOLTIP),
                io.Image.Input("image", tooltip="The decoded image to draw the maps over (it also orders this node after the sampler)."),
                io.Int.Input("resolution", default=0, min=0, max=256,
                             tooltip="Cross-attention grid (16² on SD1.5 at 512 px, as in Prompt-to-Prompt). "
                                     + AUTO_CROSS_TOOLTIP),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05, tooltip="Opacity of the heat colours over the image."),
                io.Latent.Input("latent", optional=True, tooltip=LATENT_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(display_name="heatmaps", tooltip="One image per word (per image, in order): the map over the image."),
                io.Mask.Output(display_name="maps", tooltip="The maps themselves, each scaled to 0..1, at the image's size."),
            ],
        )

    @classmethod
    def execute(cls, record, clip, text, words, image, resolution, opacity, latent=None) -> io.NodeOutput:
        node = "CrossAttnHeatmap"
        check_record(record, latent, node)
        try:
            prompt, prompt_tokens = record_prompt_words(record, clip, text, node)
            chosen = select_words(prompt, words)
            grid, cross_maps = recorded_maps(record, CROSS, resolution, node)
            cross_maps = fold_repeated_context(cross_maps, prompt_tokens)
        except ValueError as error:
            raise _named(node, error) from error
        size = image_size(record, image, latent)
        overlays, maps = [], []
        for index in range(cross_maps.shape[0]):
            picture = image_for(image, index, cross_maps.shape[0], node)
            for m in word_maps(cross_maps[index], grid, chosen).values():
                big = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
                big = min_max(big)
                maps.append(big)
                overlays.append(heat_overlay(big, picture, opacity))
        return io.NodeOutput(torch.stack(overlays), torch.stack(maps))


class SelfAttnPCA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfAttnPCA",
            display_name="Self-Attention PCA (Attention Lab)",
            category=CATEGORY,
            description=(
                "The first three principal components of the self-attention features (each token's averaged "
                "attention row) as red, green and blue, as in Plug-and-Play's feature visualisations: regions the "
                "model treats as one part share a colour. Each component is oriented so that the minority of tokens "
                "far from the bulk is bright: the first one (red) lights up the objects against the background."
            ),
            inputs=[
                AttentionRecord.Input("record", tooltip="From AttentionRecorder (after sampling) or RecordAttentionPass."),
                io.Int.Input("resolution", default=0, min=0, max=256, tooltip="Self-attention grid. " + AUTO_SELF_TOOLTIP),
                io.Latent.Input("latent", optional=True, tooltip=LATENT_TOOLTIP),
                io.Image.Input("image", optional=True, tooltip="Only its size is used (without it: the latent's size × 8)."),
            ],
            outputs=[io.Image.Output(tooltip="Three principal components as RGB, one image per image of the record.")],
        )

    @classmethod
    def execute(cls, record, resolution, latent=None, image=None) -> io.NodeOutput:
        node = "SelfAttnPCA"
        check_record(record, latent, node)
        grid, self_maps = recorded_maps(record, SELF, resolution, node)
        size = image_size(record, image, latent)
        # bilinear: the grid is coarse (8² on the demo model) and nearest cells would hide the shapes
        pictures = [
            F.interpolate(pca_rgb(features, grid).permute(2, 0, 1)[None], size=size, mode="bilinear",
                          align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)
            for features in self_maps
        ]
        return io.NodeOutput(torch.stack(pictures))
