"""The source branch shared by the editing nodes (Prompt-to-Prompt, Plug-and-Play).

An edit is sampled in one batch next to the image it edits: every input image
becomes a group of rows `[source, edit_1, ..., edit_n]` from the same noise, one
prompt per row, so a technique on the router reads the source row of the same
UNet call. For a real image the source row follows its INVERSION: the DDIM
sampler below puts it back on the inverted trajectory after every step, so at
each step the UNet sees the inversion's own latent there.
"""

from __future__ import annotations

import comfy.samplers
import torch

from ..inversion import Inversion, ddim_sample
from .inversion import SamplerModel, check_invertible


def encode_group(clip, prompts: list[str], node: str, name: str = "prompts"):
    """One CONDITIONING whose rows are the prompts, in order (ComfyUI tiles it over the batch)."""
    conds, pooled, extras = [], [], None
    for text in prompts:
        encoded = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        if len(encoded) != 1:
            raise ValueError(f"{node}: clip: its encoding of a prompt is scheduled in several parts (hooks); this "
                             "node needs one conditioning per prompt")
        cond, extra = encoded[0]
        conds.append(cond)
        pooled.append(extra.get("pooled_output"))
        extras = extras or dict(extra)
    if len({c.shape for c in conds}) > 1:
        raise ValueError(f"{node}: {name}: the prompts encode to different token lengths; keep each under 75 tokens")
    extras = dict(extras)
    if all(p is not None for p in pooled):
        extras["pooled_output"] = torch.cat(pooled)
    return [[torch.cat(conds), extras]]


# Keys of a conditioning entry that describe its text encoding; the branches keep their own.
ENCODING_KEYS = frozenset({"pooled_output", "attention_mask", "cross_attn"})


def positive_tooltip(branches: str) -> str:
    """The tooltip of a node's optional `positive`, whose extras `carry_extras` adds to `branches`."""
    return (f"Optional: a conditioning whose extras reach {branches}, e.g. CLIPTextEncode -> "
            "ControlNetApplyAdvanced (apply the same ControlNet to the negative where the node takes one). Its text "
            "is not used: each branch keeps its own prompt; its control, area, mask and strength are added to every "
            "branch. Several entries (Conditioning Combine) give several conditionings, each over every branch. Not "
            "connected: the prompts alone.")


def carry_extras(encoded, conditioning, node: str, name: str = "positive"):
    """`encoded` (one entry, every branch's prompt as a row) with the extras of each entry of the user's
    `conditioning`: a ControlNet's `control`, areas, masks, strengths, ... reach every branch, while the
    text and pooled output stay the branches' own. One entry out per entry in (ComfyUI combines them as
    it combines any conditioning list); `conditioning` None leaves `encoded` as it is."""
    if conditioning is None:
        return encoded
    if not isinstance(conditioning, list) or not conditioning or not all(
            isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)
            for entry in conditioning):
        raise ValueError(f"{node}: {name}: expected a CONDITIONING (e.g. from ControlNetApplyAdvanced), got "
                         f"{type(conditioning).__name__}")
    (cond, extras), = encoded
    return [[cond, {**extras, **{k: v for k, v in entry[1].items() if k not in ENCODING_KEYS}}]
            for entry in conditioning]


class SourceBranchGuider(comfy.samplers.CFGGuider):
    """CFG over groups `[source, edits...]`: every input latent (and its noise and mask) becomes `group` rows."""

    def __init__(self, model_patcher, group: int):
        super().__init__(model_patcher)
        self.group = group

    def begin(self) -> None:
        """Called before each sampling run (a technique forgets the previous run's state)."""

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        group = self.group
        expand = lambda t: t if t is None else t.repeat_interleave(group, dim=0)  # noqa: E731
        if denoise_mask is not None and denoise_mask.shape[0] == noise.shape[0]:
            denoise_mask = expand(denoise_mask)
        self.begin()
        return super().sample(expand(noise), expand(latent_image), sampler, sigmas, denoise_mask, callback,
                              disable_pbar, seed)


def sample_ddim_tracking_source(model, x, sigmas, extra_args=None, callback=None, disable=None,
                                inversion: Inversion | None = None, group: int = 1, track_source: bool = True,
                                node: str = "PromptToPromptEditInversion"):
    """DDIM sampling of groups `[source, edits...]` from the inverted noise; with `track_source` the source rows
    are put back on their inverted trajectory after every step (the direct-inversion correction), so the
    edits take the attention of the image's own trajectory and the source row ends on the image's latent."""
    calls = SamplerModel(model, extra_args, callback, len(sigmas) - 1, disable)
    check_invertible(*calls.sampling(), node)
    x_start = inversion.latent_at(float(sigmas[0])).to(x.device).repeat_interleave(group, dim=0)

    def keep_source(k, latent):
        if not track_source:
            return latent
        latent = latent.clone()
        latent[::group] = inversion.latent_at(float(sigmas[k + 1])).to(latent.device, latent.dtype)
        return latent

    return ddim_sample(calls, x_start, sigmas, calls.progress, after_step=keep_source)
