"""Plug-and-Play (Tumanyan et al.): translate an image by text while keeping its structure.

The edit is sampled from the guidance image's inverted noise next to a guidance
branch whose latent at every step is the inversion's own (never re-denoised).
In groups of batch rows `[guidance, edit_1, ..., edit_n]` of every chunk
(conditional and unconditional alike), the edits take from the guidance row of
the same chunk and the same UNet call (MichalGeyer/plug-and-play, pnp.py):

- the residual-block features of one decoder layer, for the first
  `feature_steps` of the schedule (τ_f = 0.8): the output of the residual
  branch, before the block adds its skip connection, as the authors'
  `register_conv_control_efficient` replaces `hidden_states` after `conv2`;
- the self-attention queries and keys of the decoder layers, for the first
  `attention_steps` (τ_A = 0.5): `attend(q_g, k_g, v_e)`, the authors'
  `register_attention_control_efficient` (the values stay the edit's).

Layers by role (SD1.5 in diffusers' names → LDM/ComfyUI output blocks → SDXL):
the features of `up_blocks[1].resnets[1]`, the second block of the decoder
level at 1/4 of the latent's resolution (SD1.5: output block 4, 16² at 512²;
SDXL: output block 1, 32² at 1024²); queries and keys in every decoder
self-attention layer at 1/4 resolution or finer except the first block of the
1/4 level (the authors' `res_dict = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}`:
SD1.5 output blocks 4–11, SDXL output blocks 1–5, all transformer depths).

Time windows are the authors' `scheduler.timesteps[:int(n·τ)]`: step index
k < int(τ·n) of the n-step schedule, the index read from the sampler's sigmas.

Where the pack differs from the authors' code, and why: their batch is
`[guidance, uncond, cond]` with the guidance row in neither CFG half; here the
guidance row is a row of each CFG chunk (its text the guidance prompt in both),
the layout the pack's source-branch guider samples (as Prompt-to-Prompt's).
The guidance rows of the two chunks are the same latent and text, so both give
the authors' injected tensors, and split cond/uncond calls or cfg = 1 inject
the same; the cost is one more UNet row per image than theirs at cfg > 1.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .call import ChunkLayout, StepClock
from .router import AttentionTechnique

FEATURE_STEPS = 0.8  # τ_f: the authors' pnp_f_t
ATTENTION_STEPS = 0.5  # τ_A: the authors' pnp_attn_t
FEATURE_DOWNSAMPLE = 4  # up_blocks[1] of SD1.5: the decoder level at 1/4 of the latent's side
FEATURE_BLOCK = 1  # its second block (resnets[1])


def active(fraction: float, step: int | None, total: int | None) -> bool:
    """The authors' `timesteps[:int(n·τ)]`: the first int(τ·n) steps; never outside sampling."""
    if step is None or not total:
        return False
    return step < int(fraction * total)


def group_rows(layout: ChunkLayout, group: int) -> tuple[list[int], list[int]]:
    """(edit rows, their guidance rows) over every chunk: images `[guidance, edit_1..]` per group."""
    images = layout.images
    if images % group:
        raise ValueError(f"Plug-and-Play: {images} images per chunk do not split into groups of {group} "
                         f"(the guidance image and {group - 1} translations)")
    edits, guides = [], []
    for chunk in layout.chunks():
        for image in range(images):
            member = image % group
            if member:
                edits.append(layout.row(chunk, image))
                guides.append(layout.row(chunk, image - member))
    return edits, guides


def decoder_roles(levels: Iterable[tuple[int, int]], feature_downsample: int = FEATURE_DOWNSAMPLE,
                  feature_block: int = FEATURE_BLOCK) -> tuple[int, set[int]]:
    """(feature block, attention blocks) by role, from the decoder's `(output block id, downsampling)` pairs
    in execution order, downsampling as the latent's side over the block's grid side.

    The feature block is block `feature_block` of the level at `feature_downsample`; attention is injected
    in that level from that block on and in every finer level.
    """
    levels = list(levels)
    level = [block for block, down in levels if down == feature_downsample]
    if len(level) <= feature_block:
        found = sorted({down for _, down in levels})
        raise ValueError(f"the decoder has no block {feature_block} at 1/{feature_downsample} of the latent's "
                         f"resolution (its levels: 1/{', 1/'.join(map(str, found))}); Plug-and-Play needs an "
                         "SD1.x/SD2.x/SDXL-style UNet")
    feature = level[feature_block]
    attention = {block for block, down in levels if down < feature_downsample or
                 (down == feature_downsample and block >= feature)}
    return feature, attention


class PlugAndPlay(AttentionTechnique):
    """Injects the guidance rows' decoder features and self-attention queries/keys into the edit rows."""

    name = "plug_and_play"
    order = 40

    def __init__(self, attention_layers: Iterable[tuple], group: int = 2, feature_steps: float = FEATURE_STEPS,
                 attention_steps: float = ATTENTION_STEPS):
        if group < 2:
            raise ValueError("Plug-and-Play needs a guidance image and at least one translation per group")
        self.attention_layers = frozenset(map(tuple, attention_layers))
        self.group = group
        self.feature_steps = feature_steps
        self.attention_steps = attention_steps
        self._clock = StepClock()
        self._armed: dict | None = None

    # -- self-attention (through the router) -----------------------------------------------------

    def wants(self, call) -> bool:
        return (call.is_self and call.layer in self.attention_layers
                and active(self.attention_steps, call.step, call.total_steps))

    def __call__(self, q, k, v, call, attend, mask=None):
        edits, guides = group_rows(call.layout, self.group)
        q2, k2 = q.clone(), k.clone()
        q2[edits], k2[edits] = q[guides], k[guides]
        return attend(q2, k2, v, mask)

    # -- residual-block features -----------------------------------------------------------------

    def arm(self, transformer_options: dict) -> None:
        """Called as the feature block starts: its residual branch will inject with this call's layout and step."""
        self._armed = transformer_options

    def inject_features(self, h: torch.Tensor) -> torch.Tensor:
        """The residual branch's output `h` [B, C, H, W] with the edit rows replaced by their guidance rows'."""
        options, self._armed = self._armed, None
        if options is None:
            return h
        step, total, _ = self._clock.read(options)
        if not active(self.feature_steps, step, total):
            return h
        layout = ChunkLayout.of(h.shape[0], options.get("cond_or_uncond"))
        edits, guides = group_rows(layout, self.group)
        h = h.clone()
        h[edits] = h[guides]
        return h


class FeatureInjection(torch.nn.Module):
    """The last layer of the feature block's residual branch: hands its output to the technique."""

    def __init__(self, technique: PlugAndPlay):
        super().__init__()
        self.technique = technique

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.technique.inject_features(h)


class ArmFeatureBlock:
    """An output-block patch (ComfyUI's `output_block_patch` list) that arms the injection as its block starts."""

    def __init__(self, technique: PlugAndPlay, block: int):
        self.technique, self.block = technique, block

    def __call__(self, h, hsp, transformer_options):
        if tuple(transformer_options.get("block", ())) == ("output", self.block):
            self.technique.arm(transformer_options)
        return h, hsp

    def __deepcopy__(self, memo):
        return self


__all__ = ["PlugAndPlay", "FeatureInjection", "ArmFeatureBlock", "decoder_roles", "group_rows", "active",
           "FEATURE_STEPS", "ATTENTION_STEPS"]
