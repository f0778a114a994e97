"""PromptToPromptEdit: edit an image by editing its prompt (Prompt-to-Prompt, Hertz et al.).

The math is attention_patches/prompt_to_prompt.py. This adapter returns a
GUIDER for SamplerCustomAdvanced, so any sampler and scheduler work: the guider
samples every input image as a group `[source, edit_1, ..., edit_n]` from the
same noise (one batch, one UNet call per step and CFG half), with the prompts
stacked into one positive conditioning, and applies local blend to each step's
denoised estimate.

A GUIDER rather than a patched MODEL for KSampler: the source and its edits
must be rows of one batch with one prompt each, which a KSampler's single
positive conditioning and user-sized latent cannot express, while a guider
builds the batch itself, like ComfyUI's Guider_PerpNeg.

The node encodes the prompts itself with the CLIP it is given (so a LoRA'd CLIP
works): the word alignment needs the prompts' texts and tokens, and typing each
prompt once means the conditioning and the alignment can never disagree.
A ControlNet (or area, mask, strength) reaches the branches through the optional
`positive` conditioning, whose extras are added to every branch's encoded prompt.
The local-blend mask is known only after sampling: PromptToPromptEditInversion
outputs it, and for the guider PromptToPromptBlendMask reads it once the sampler ran.
"""

from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.latest import io

from ..attention_patches import prompt_to_prompt as p2p
from ..attention_patches.words import word_positions
from ..inversion import Inversion
from . import source_branch
from .inversion import INVERSION, check_inversion, guided_sample, sample_replay
from .null_text import add_null_text, null_text_embeddings
from .patching import attach_router
from .tokens import one_chunk
from .source_branch import SourceBranchGuider, sample_ddim_tracking_source

NODE = "PromptToPromptEdit"
IMAGE_NODE = "PromptToPromptEditInversion"
MASK_NODE = "PromptToPromptBlendMask"
MODES = ("auto", "word swap", "refine")
FRACTION = dict(min=0.0, max=1.0, step=0.01)
POSITIVE_TOOLTIP = source_branch.positive_tooltip("the source and every edit")
BLEND_MASK_TOOLTIP = ("Local blend's mask at the last step, one per edit (per image, then per edit), at the latent's "
                      "size: 1 where the edit may differ from the source, 0 where it is the source. All ones "
                      "without blend_words (the edit applies everywhere).")


def _error(name: str, message: str) -> ValueError:
    return ValueError(f"{NODE}: {name}: {message}")


def parse_weights(text: str, name: str) -> list[tuple[str, str]]:
    """'word=value, other word=value' -> [(word, value text)]."""
    entries = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if "=" not in part:
            raise _error(name, f"'{part}' is not 'word=value' (e.g. 'fluffy=2, red=-1')")
        word, value = (s.strip() for s in part.split("=", 1))
        if not word:
            raise _error(name, f"'{part}' names no word")
        entries.append((word.lower(), value))
    return entries


def _fraction(value: str, name: str, word: str) -> tuple[float, float]:
    try:
        bounds = [float(v) for v in value.split("-")] if "-" in value.strip()[1:] else [0.0, float(value)]
    except ValueError:
        raise _error(name, f"'{word}={value}': expected a fraction (0.5) or a range (0.2-0.6)") from None
    if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1] <= 1:
        raise _error(name, f"'{word}={value}': fractions between 0 and 1, start ≤ end")
    return bounds[0], bounds[1]


def build_technique(clip, source_prompt: str, edit_prompts: list[str], mode: str = "auto",
                    cross_replace_steps: float = p2p.CROSS_REPLACE_STEPS,
                    self_replace_steps: float = p2p.SELF_REPLACE_STEPS, reweight: str = "",
                    word_cross_replace_steps: str = "", blend_words: str = "",
                    blend_threshold: float = p2p.BLEND_THRESHOLD) -> p2p.PromptToPrompt:
    """The technique for the source and its edits, every input checked (raises ValueError naming the input)."""
    if mode not in MODES:
        raise _error("mode", f"'{mode}' is not one of {', '.join(MODES)}")
    if not source_prompt.strip():
        raise _error("source_prompt", "is empty: give the prompt of the image to edit")
    if not edit_prompts:
        raise _error("edit_prompts", "no edited prompt: give one per line (e.g. the source with one word changed)")
    tokens = 77
    prompts = [source_prompt] + edit_prompts
    tokenized = [one_chunk(clip, p, NODE, "source_prompt" if i == 0 else "edit_prompts") for i, p in enumerate(prompts)]
    ids = [list(t.first_chunk) for t in tokenized]
    words = [list(t.words) for t in tokenized]
    source_words = [(w.text, w.positions) for w in words[0]]

    weights = parse_weights(reweight, "reweight")
    windows = [(w, _fraction(v, "word_cross_replace_steps", w))
               for w, v in parse_weights(word_cross_replace_steps, "word_cross_replace_steps")]
    for name, entries in (("reweight", weights), ("word_cross_replace_steps", windows)):
        for word, _ in entries:
            if not any(word_positions(words[i], word) for i in range(1, len(prompts))):
                raise _error(name, f"'{word}' is in no edited prompt (the edits' words: "
                                   f"{', '.join(dict.fromkeys(w.text for ws in words[1:] for w in ws))})")
    parsed_weights = []
    for word, value in weights:
        try:
            parsed_weights.append((word, float(value)))
        except ValueError:
            raise _error("reweight", f"'{word}={value}': the weight is not a number") from None

    edits = []
    for i in range(1, len(prompts)):
        edit_words = [(w.text, w.positions) for w in words[i]]
        kind = mode if mode != "auto" else ("word swap" if len(edit_words) == len(source_words) else "refine")
        equalizer = p2p.word_equalizer([(word_positions(words[i], w), v) for w, v in parsed_weights], tokens)
        cross = [(None, (0.0, cross_replace_steps))]
        cross += [(word_positions(words[i], w), b) for w, b in windows if word_positions(words[i], w)]
        if kind == "word swap":
            if len(edit_words) != len(source_words):
                raise _error("edit_prompts", f"a word swap needs as many words as the source, but "
                                             f"'{prompts[i]}' has {len(edit_words)} and '{source_prompt}' "
                                             f"{len(source_words)}; use mode refine to add words")
            edits.append(p2p.swap_edit(source_words, edit_words, tokens, equalizer=equalizer, cross_windows=cross))
        else:
            mapper, alphas = p2p.refinement_mapper(ids[0], ids[i], tokens)
            mapped = set(mapper[alphas > 0].tolist())
            lacking = [w.text for w in words[0] if not set(w.positions) <= mapped]
            if lacking:
                raise _error("edit_prompts", f"a refinement keeps every source word and adds words, but "
                                             f"'{prompts[i]}' lacks {', '.join(repr(w) for w in lacking)} of the "
                                             "source; use mode word swap to replace words")
            edits.append(p2p.refine_edit(ids[0], ids[i], tokens, equalizer=equalizer, cross_windows=cross))

    blend = torch.zeros(len(prompts), tokens)
    for word in [w.strip().lower() for w in blend_words.split(",") if w.strip()]:
        found = [i for i in range(len(prompts)) if word_positions(words[i], word)]
        if not found:
            listed = ", ".join(dict.fromkeys(w.text for ws in words for w in ws))
            raise _error("blend_words", f"'{word}' is in none of the prompts (their words: {listed})")
        for i in found:
            blend[i, list(word_positions(words[i], word))] = 1
    return p2p.PromptToPrompt(edits, self_replace_steps=self_replace_steps,
                              blend_words=blend if blend.any() else None, blend_threshold=blend_threshold)


def encode_group(clip, prompts: list[str]):
    """One positive CONDITIONING whose rows are the prompts, in order (ComfyUI tiles it over the batch)."""
    return source_branch.encode_group(clip, prompts, NODE, "edit_prompts")


class PromptToPromptGuider(SourceBranchGuider):
    """CFG over groups `[source, edits...]` per input image, local blend on each step's denoised estimate."""

    def __init__(self, model_patcher, technique: p2p.PromptToPrompt):
        super().__init__(model_patcher, technique.group)
        self.technique = technique

    def begin(self) -> None:
        self.technique.begin()

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return self.technique.blend(super().predict_noise(x, timestep, model_options, seed))


def make_guider(model, clip, negative, source_prompt: str, edit_prompts: list[str], cfg: float, positive=None,
                **controls):
    """The guider over `[source, edits...]`; `positive`'s extras (a ControlNet's control, ...) reach every row."""
    technique = build_technique(clip, source_prompt, edit_prompts, **controls)
    positive = source_branch.carry_extras(encode_group(clip, [source_prompt] + edit_prompts), positive, NODE)
    patched = model.clone()
    attach_router(patched, NODE).add(technique)
    guider = PromptToPromptGuider(patched, technique)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


class PromptToPromptEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE,
            display_name="Prompt-to-Prompt Edit (Attention Lab)",
            category="attention_lab/editing",
            description=(
                "Prompt-to-Prompt (Hertz et al.): the source prompt's image and each edited prompt's image from the "
                "same noise, the edits following the source's cross-attention maps, so that changing a word changes "
                "only what the word shows. Connect the GUIDER to SamplerCustomAdvanced (any sampler and sigmas); "
                "for every input latent it outputs the source, then each edit, in order. PromptToPromptBlendMask shows "
                "the local-blend mask it used. SD1.x, SD2.x and SDXL."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (model patches and LoRA compose)."),
                io.Clip.Input("clip", tooltip="Encodes the source and edited prompts and aligns their words."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (CLIPTextEncode), shared by every "
                                                          "image; unused at cfg 1."),
                io.String.Input("source_prompt", multiline=True, default="a red circle on a striped yellow background",
                                tooltip="The prompt of the image to edit."),
                io.String.Input("edit_prompts", multiline=True, default="a blue circle on a striped yellow background",
                                tooltip="One edited prompt per line: each becomes one more image of the batch. Word "
                                        "swap: change words ('cat' -> 'dog'); refine: add words ('a cat' -> "
                                        "'a fluffy cat')."),
                io.Combo.Input("mode", options=list(MODES), default="auto",
                               tooltip="word swap: the edit has as many words as the source and swaps some; its "
                                       "maps are the source's (a swapped word with another token count is spread "
                                       "over its tokens). refine: the edit keeps every source word and adds some; "
                                       "aligned tokens take the source's maps, added words keep their own. auto: "
                                       "word swap when the word counts are equal, else refine."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (authors: 7.5). 1 skips the negative."),
                io.Float.Input("cross_replace_steps", default=p2p.CROSS_REPLACE_STEPS, **FRACTION,
                               tooltip="Share of the steps, from the start, in which the edits' cross-attention maps "
                                       "come from the source (authors: 0.8). Lower lets the edit change shape more."),
                io.Float.Input("self_replace_steps", default=p2p.SELF_REPLACE_STEPS, **FRACTION,
                               tooltip="Share of the steps in which the edits take the source's self-attention maps "
                                       "in the two lowest-resolution levels (authors: 0.4). Higher keeps more of "
                                       "the source's layout and background."),
                io.String.Input("reweight", default="",
                                tooltip="Scale words' cross-attention in the edits: 'word=weight, ...' (e.g. "
                                        "'striped=2' strengthens it, 'red=-1' inverts it). Words of the edited "
                                        "prompts. Empty: no re-weighting."),
                io.String.Input("word_cross_replace_steps", default="",
                                tooltip="Per-word override of cross_replace_steps: 'word=fraction' or "
                                        "'word=start-end' (e.g. 'blue=0.4'), words of the edited prompts. Empty: "
                                        "every word uses cross_replace_steps."),
                io.String.Input("blend_words", default="",
                                tooltip="Local blend: comma-separated words (e.g. 'red, blue' or 'circle'); each is "
                                        "looked up in every prompt. Outside the union of the source's and the edit's "
                                        "masks for these words, the edit equals the source. Empty: no local blend."),
                io.Float.Input("blend_threshold", default=p2p.BLEND_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend's threshold on the max-normalised, 3x3-dilated word maps "
                                       "(authors: 0.3). Lower grows the editable region."),
                io.Conditioning.Input("positive", optional=True, tooltip=POSITIVE_TOOLTIP),
            ],
            outputs=[io.Guider.Output("guider", tooltip="For SamplerCustomAdvanced: outputs the source and each edit "
                                                        "per input latent, in that order.")],
        )

    @classmethod
    def execute(cls, model, clip, negative, source_prompt, edit_prompts, mode, cfg, cross_replace_steps,
                self_replace_steps, reweight, word_cross_replace_steps, blend_words, blend_threshold,
                positive=None) -> io.NodeOutput:
        edits = [line.strip() for line in edit_prompts.splitlines() if line.strip()]
        return io.NodeOutput(make_guider(
            model, clip, negative, source_prompt.strip(), edits, cfg, positive, mode=mode,
            cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps, reweight=reweight,
            word_cross_replace_steps=word_cross_replace_steps, blend_words=blend_words,
            blend_threshold=blend_threshold))


def edit_inversion(model, clip, inversion, negative, source_prompt: str, edit_prompts: list[str], cfg: float,
                   add_final_residual: bool = False, track_source: bool = True, positive=None,
                   null_text: bool = False, **controls) -> torch.Tensor:
    """`edit_inversion_run`'s LATENT tensor."""
    return edit_inversion_run(model, clip, inversion, negative, source_prompt, edit_prompts, cfg, add_final_residual,
                              track_source, positive, null_text, **controls)[0]


def edit_inversion_run(model, clip, inversion, negative, source_prompt: str, edit_prompts: list[str], cfg: float,
                       add_final_residual: bool = False, track_source: bool = True, positive=None,
                       null_text: bool = False, **controls) -> tuple[torch.Tensor, PromptToPromptGuider]:
    """Prompt-to-Prompt on an inverted image: every group `[source, edits...]` starts from the INVERSION.

    DDPM (edit-friendly): all rows replay the stored noise maps, so the source row
    reconstructs the image (with the inversion's prompt, negative and cfg) and the
    edits share its noise. DDIM: deterministic sampling from the inverted noise; with
    `track_source` the source rows follow the inverted trajectory (direct inversion).
    Returns the user-space LATENT tensor, rows `[source, edit_1, ...]` per image, and the guider
    that sampled it (its technique holds the last step's local-blend mask).
    """
    check_inversion(inversion, model, IMAGE_NODE)
    if null_text and inversion.kind != "ddim":
        raise ValueError(f"{IMAGE_NODE}: null_text: needs a ddim inversion (DDIMInvert's method ddim, cfg 1); a ddpm "
                         "inversion's source branch reconstructs the image without it")
    if null_text and cfg <= 1.0:
        raise ValueError(f"{IMAGE_NODE}: null_text: cfg is {cfg}; null-text optimisation corrects guided sampling "
                         "(the authors: cfg 7.5), at cfg 1 there is no unconditional branch to optimise")
    guider = make_guider(model, clip, negative, source_prompt, edit_prompts, cfg, positive, **controls)
    group = guider.technique.group
    if null_text:
        embeddings = null_text_embeddings(model, inversion, encode_group(clip, [source_prompt]), negative, cfg)
        add_null_text(guider.model_patcher, embeddings, inversion.sampling_sigmas, group)
    spread = lambda t: None if t is None else t.repeat_interleave(group, dim=1 if t.dim() == 5 else 0)  # noqa: E731
    grouped = Inversion(latents=spread(inversion.latents), sigmas=inversion.sigmas, kind=inversion.kind,
                        noise_maps=spread(inversion.noise_maps), final_residual=spread(inversion.final_residual))
    sigmas = inversion.sampling_sigmas
    if inversion.kind == "ddpm":
        sampler = comfy.samplers.KSAMPLER(sample_replay, {"inversion": grouped, "add_final_residual": add_final_residual,
                                                          "node": IMAGE_NODE})
    else:
        sampler = comfy.samplers.KSAMPLER(sample_ddim_tracking_source, {"inversion": inversion, "group": group,
                                                                        "track_source": track_source,
                                                                        "node": IMAGE_NODE})
    x_start = model.model.process_latent_out(inversion.latent_at(float(sigmas[0])))
    return guided_sample(guider, sampler, sigmas, x_start, seed=0), guider


class PromptToPromptEditInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        schema = PromptToPromptEdit.define_schema()
        controls = [i for i in schema.inputs if i.id not in ("model", "clip", "negative", "cfg", "positive")]
        return io.Schema(
            node_id=IMAGE_NODE,
            display_name="Prompt-to-Prompt Edit Image (Attention Lab)",
            category="attention_lab/editing",
            description=(
                "Prompt-to-Prompt on a real image: invert it with DDIMInvert (method ddpm: the source branch then "
                "reconstructs the image exactly), give the prompt it was inverted with as source_prompt, and this "
                "node replays the inversion for the source and every edited prompt in one run. Outputs the source "
                "and each edit per image, in order. With a ddim inversion (cfg 1), null_text runs the authors' "
                "null-text optimisation so the edit can be sampled at cfg 7.5; it is off by default because it "
                "costs about 15x the sampling and a ddpm inversion reconstructs exactly without it."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the image was inverted with (patches compose)."),
                io.Clip.Input("clip", tooltip="Encodes the source and edited prompts and aligns their words."),
                INVERSION.Input("inversion", tooltip="From DDIMInvert. ddpm: exact source reconstruction; ddim: "
                                                     "deterministic sampling from the inverted noise."),
                io.Conditioning.Input("negative", tooltip="The negative the image was inverted with (CLIPTextEncode); "
                                                          "unused at cfg 1."),
                io.Float.Input("cfg", default=1.0, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="The cfg the image was inverted with (DDIMInvert's): the source branch "
                                       "reconstructs the image only with the inversion's prompt, negative and cfg. "
                                       "With null_text: the guidance of the edit (the authors: 7.5)."),
                *controls,
                io.Boolean.Input("add_final_residual", default=False,
                                 tooltip="ddpm only: add the inversion's last-step residual to every row (exact "
                                         "source reconstruction; it also carries the source's fine detail into "
                                         "the edits). Off as in the papers."),
                io.Boolean.Input("track_source", default=True,
                                 tooltip="ddim only: after every step put the source branch back on the image's "
                                         "inverted trajectory (direct inversion), so the source reconstructs the "
                                         "image exactly and the edits take its attention. Off: plain DDIM sampling "
                                         "of every branch from the inverted noise."),
                io.Boolean.Input("null_text", default=False,
                                 tooltip="ddim only: null-text optimisation (Mokady et al.): before sampling, "
                                         "optimise the unconditional embedding of every step so that guided "
                                         "sampling (cfg above 1, the authors' 7.5) retraces the cfg-1 DDIM "
                                         "inversion; the source then reconstructs the image at that cfg. Costs up "
                                         "to 10 backward passes per step (about 15x the edit's own sampling). "
                                         "Use with track_source off; invert at cfg 1."),
                io.Conditioning.Input("positive", optional=True, tooltip=POSITIVE_TOOLTIP),
            ],
            outputs=[io.Latent.Output(tooltip="Per image: the source (reconstruction), then each edit, in order."),
                     io.Mask.Output("blend_mask", tooltip=BLEND_MASK_TOOLTIP)],
        )

    @classmethod
    def execute(cls, model, clip, inversion, negative, cfg, source_prompt, edit_prompts, mode, cross_replace_steps,
                self_replace_steps, reweight, word_cross_replace_steps, blend_words, blend_threshold,
                add_final_residual, track_source, null_text=False, positive=None) -> io.NodeOutput:
        edits = [line.strip() for line in edit_prompts.splitlines() if line.strip()]
        samples, guider = edit_inversion_run(
            model, clip, inversion, negative, source_prompt.strip(), edits, cfg, add_final_residual, track_source,
            positive, null_text, mode=mode,
            cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps, reweight=reweight,
            word_cross_replace_steps=word_cross_replace_steps, blend_words=blend_words,
            blend_threshold=blend_threshold)
        return io.NodeOutput({"samples": samples}, blend_masks(guider, samples, IMAGE_NODE))


def blend_masks(guider, samples: torch.Tensor, node: str, name: str = "samples") -> torch.Tensor:
    """The MASK of `guider`'s last run over `samples` (its LATENT tensor): one per edit, at the latent's size."""
    technique = guider.technique
    if samples.shape[0] % technique.group:
        raise ValueError(f"{node}: {name}: {samples.shape[0]} latents are not groups of the source and its "
                         f"{technique.group - 1} edit(s): connect the LATENT sampled with this guider")
    try:
        return technique.edit_masks(samples.shape[0] // technique.group, tuple(samples.shape[-2:]))
    except ValueError as error:
        raise ValueError(f"{node}: {name}: {error}: connect the LATENT that SamplerCustomAdvanced sampled with "
                         "this guider") from error


class PromptToPromptBlendMask(io.ComfyNode):
    """The local-blend mask of a PromptToPromptEdit guider, read after SamplerCustomAdvanced sampled with it.

    The guider node runs before sampling, so it cannot output what sampling finds; this node takes the
    sampled LATENT as an input, which makes ComfyUI run it after the sampler.
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=MASK_NODE,
            display_name="Prompt-to-Prompt Blend Mask (Attention Lab)",
            category="attention_lab/editing",
            description=(
                "The local-blend mask that a Prompt-to-Prompt Edit guider used at the last step of its sampling: "
                "one mask per edit (per input latent, then per edit), at the latent's size. Connect the guider and "
                "the LATENT that SamplerCustomAdvanced sampled with it; preview with MaskToImage."
            ),
            inputs=[
                io.Guider.Input("guider", tooltip="The GUIDER of PromptToPromptEdit that sampled `samples`."),
                io.Latent.Input("samples", tooltip="SamplerCustomAdvanced's output sampled with this guider (it "
                                                   "also makes this node run after the sampler)."),
            ],
            outputs=[io.Mask.Output("blend_mask", tooltip=BLEND_MASK_TOOLTIP)],
        )

    @classmethod
    def execute(cls, guider, samples) -> io.NodeOutput:
        if not isinstance(guider, PromptToPromptGuider):
            raise ValueError(f"{MASK_NODE}: guider: expected the GUIDER of PromptToPromptEdit, got "
                             f"{type(guider).__name__}")
        return io.NodeOutput(blend_masks(guider, samples["samples"], MASK_NODE))
