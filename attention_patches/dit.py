"""The router on diffusion transformers (Flux, SD3): the same techniques, through ComfyUI's DiT hooks.

A DiT has no per-layer attention replace patches. ComfyUI gives two other places,
and the adapter uses both, chained to whatever another pack put there first:

- `transformer_options["patches_replace"]["dit"][("double_block" | "single_block", i)]`:
  `DitBlockPatch` runs the block (or the patch another pack set on it) with a copy of
  `transformer_options` that names the block and, for a double-stream block, how many
  text tokens lead the joint sequence;
- `transformer_options["optimized_attention_override"]`: ComfyUI's `wrap_attn` calls it
  for every attention of the model with `(func, q, k, v, heads, mask=…, skip_reshape=…,
  transformer_options=…)`. `DitAttentionOverride` reads the block from those options,
  builds the `AttentionCall` and sends the call through the router's techniques; the
  chain ends in the override that was there before (a speed pack's Sage/Flash kernel)
  or, without one, in `func`, ComfyUI's own attention. It never replaces either.

An APPLY_MODEL wrapper (`DitLatentWrapper`) adds the latent's size and the prompt's token
count to the options of each model call, so techniques get the image grid (latent size /
patch size) and single-stream blocks, which see only `[text; image]`, know where the
image starts.

Techniques see q/k/v as `[B, N, heads·dim_head]` with N the whole joint sequence
(`call.text_tokens` text tokens, then `call.tokens` image tokens, then any further
tokens such as Flux Kontext's reference images). Flux hands its q/k/v to the override
as `[B, heads, N, dim_head]`, after RoPE: a technique that moves keys between images
moves them with the positions they were rotated for.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .call import AttentionCall, ChunkLayout, Layer
from .router import AttentionRouter

log = logging.getLogger("attention_lab")

DIT_FAMILIES = ("flux", "sd3")
#: transformer_options key: the `RunningBlock`
BLOCK_KEY = "attention_lab.dit_block"
#: transformer_options key: (latent height, latent width, prompt tokens or None) of the model call
LATENT_KEY = "attention_lab.dit_latent"


@dataclass
class RunningBlock:
    """The block a DiT is running, as its attention calls see it in transformer_options."""

    kind: str
    index: int
    text_tokens: int | None  # double-stream blocks know it from their txt; single-stream ones do not
    reached: bool = False  # set by our override: False after the block means another override cut us off


class DitBlockPatch:
    """The `patches_replace["dit"]` entry of one block: names the block for the attention override.

    Callable with ComfyUI's DiT replace-patch signature `(args, {"original_block": f})`,
    so a pack patching the block after us can chain to it like to any other patch.
    """

    def __init__(self, router: AttentionRouter, block: tuple[str, int], previous: Callable | None = None):
        self.router = router
        self.block = tuple(block)
        self.previous = previous

    def __call__(self, args: dict, extra: dict):
        options = dict(args.get("transformer_options") or {})
        txt = args.get("txt")
        running = RunningBlock(self.block[0], self.block[1], None if txt is None else int(txt.shape[1]))
        options[BLOCK_KEY] = running
        args = dict(args, transformer_options=options)
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        if not running.reached and self.router.techniques:
            self.router._warn_once(
                ("dit-override", self.block),
                f"{self.block[0]} {self.block[1]}: Attention Lab's techniques did not run, because another node "
                "replaced ComfyUI's attention override (optimized_attention_override) without calling the one "
                "that was set before it; apply that node before Attention Lab's nodes, or remove it")
        return out

    def __repr__(self):
        chained = f" -> {self.previous!r}" if self.previous is not None else ""
        return f"DitBlockPatch({self.block}{chained})"


class DitLatentWrapper:
    """APPLY_MODEL wrapper: the latent's height and width and the prompt's token count, for every block."""

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        options = dict(transformer_options)
        prompt = None if c_crossattn is None else int(c_crossattn.shape[1])
        options[LATENT_KEY] = (int(x.shape[-2]), int(x.shape[-1]), prompt)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def _heads_of(args: tuple, kwargs: dict) -> int:
    return int(args[3] if len(args) > 3 else kwargs["heads"])


def _with_qkv_mask(args: tuple, kwargs: dict, q, k, v, mask):
    """ComfyUI's attention arguments with q/k/v (and the mask) replaced, everything else as called."""
    args = (q, k, v) + tuple(args[3:])
    kwargs = dict(kwargs)
    if len(args) > 4:  # mask passed positionally
        args = args[:4] + (mask,) + args[5:]
    else:
        kwargs["mask"] = mask
    return args, kwargs


class DitAttentionOverride:
    """`transformer_options["optimized_attention_override"]`: every DiT attention call, through the router."""

    def __init__(self, router: AttentionRouter, patch_size: int, previous: Callable | None = None):
        self.router = router
        self.patch_size = int(patch_size)
        self.previous = previous

    def attention(self, func, args: tuple, kwargs: dict):
        """What would run without us: the previous override, or ComfyUI's attention function."""
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        running = options.get(BLOCK_KEY)
        router = self.router
        if running is None:
            return self.attention(func, args, kwargs)
        running.reached = True
        if not router.techniques:
            return self.attention(func, args, kwargs)
        q, k, v = args[:3]
        heads = _heads_of(args, kwargs)
        split = bool(kwargs.get("skip_reshape", False))  # Flux: [B, H, N, d]; SD3: [B, N, H·d]
        split_out = bool(kwargs.get("skip_output_reshape", False))
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        call = self.describe(running, q, heads, split, options)
        if call is None:
            return self.attention(func, args, kwargs)

        def base(q_, k_, v_, mask_=None):
            if split:
                q_, k_, v_ = (_split(x, heads) for x in (q_, k_, v_))
            call_args, call_kwargs = _with_qkv_mask(args, kwargs, q_, k_, v_, mask_)
            out = self.attention(func, call_args, call_kwargs)
            return _merge(out) if split_out else out

        if split:
            q, k, v = (_merge(x) for x in (q, k, v))
        else:  # SD3 hands v over as [B, N, H, d]
            q, k, v = (x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v))
        out = router.route((call.layer, True), call, base, q, k, v, mask)
        return _split(out, heads) if split_out else out

    def describe(self, running: RunningBlock, q: torch.Tensor, heads: int, split: bool,
                 options: dict) -> AttentionCall | None:
        kind, index, block_text = running.kind, running.index, running.text_tokens
        router = self.router
        tokens = q.shape[2] if split else q.shape[1]
        dim_head = q.shape[-1] if split else q.shape[-1] // heads
        latent = options.get(LATENT_KEY)
        text = block_text if block_text is not None else (latent[2] if latent is not None else None)
        if text is None:
            router._warn_once(("dit-text", kind, index),
                              f"{kind} {index}: the prompt's token count is unknown outside ComfyUI's sampling "
                              "(no apply_model call), so this block's attention runs unpatched")
            return None
        if latent is not None:
            h, w = (math.ceil(latent[0] / self.patch_size), math.ceil(latent[1] / self.patch_size))
        else:
            side = int(round((tokens - text) ** 0.5))
            h, w = side, side
        image_only = tokens == h * w and (kind, index, 1) in router.ordinal  # SD3.5's image self-attention
        layer = (kind, index, 1 if image_only else 0)
        if layer not in router.ordinal:
            return None
        step, total, sigma = router._clock.read(options)
        return AttentionCall(
            layer=layer,
            ordinal=router.ordinal[layer],
            num_layers=len(router.layers),
            is_self=True,
            height=h,
            width=w,
            heads=heads,
            dim_head=dim_head,
            step=step,
            total_steps=total,
            sigma=sigma,
            layout=ChunkLayout.of(q.shape[0], options.get("cond_or_uncond")),
            options=options,
            family=router.family,
            text_tokens=0 if image_only else text,
            joint=not image_only,
        )

    def __repr__(self):
        chained = f" -> {self.previous!r}" if self.previous is not None else ""
        return f"DitAttentionOverride({self.router.family}{chained})"


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H·d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H·d] -> [B, H, N, d]."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def dit_layers(double_blocks: int, single_blocks: int = 0, image_self_attention: Sequence[int] = ()) -> list[Layer]:
    """Router layer keys of a DiT: (kind, block index, 0) per block, (double_block, i, 1) for SD3.5's
    extra image-only self-attention in block i."""
    layers = [("double_block", i, 0) for i in range(double_blocks)]
    layers += [("double_block", i, 1) for i in image_self_attention]
    layers += [("single_block", i, 0) for i in range(single_blocks)]
    return layers


def find_override(transformer_options: dict, router: AttentionRouter) -> bool:
    """Whether the override chain in `transformer_options` reaches `router`'s override."""
    current = transformer_options.get("optimized_attention_override")
    while current is not None:
        if isinstance(current, DitAttentionOverride) and current.router is router:
            return True
        current = getattr(current, "previous", None)
    return False


def install_dit(
    transformer_options: dict,
    set_block_patch: Callable[[DitBlockPatch, tuple[str, int]], None],
    set_override: Callable[[DitAttentionOverride], None],
    family: str,
    layers: Sequence[Layer],
    patch_size: int,
    attention: Callable,
    router: AttentionRouter | None = None,
) -> AttentionRouter:
    """Install (or complete) the router on a DiT's transformer_options (read only here).

    A block replace patch another pack set before us becomes the previous patch of ours,
    and an attention override set before us becomes the end of our chain.
    """
    if family not in DIT_FAMILIES:
        raise ValueError(f"unknown DiT family {family!r}; expected one of {DIT_FAMILIES}")
    if router is None:
        router = AttentionRouter(layers, attention, family=family)
    blocks = sorted({(layer[0], layer[1]) for layer in router.layers})
    existing = transformer_options.get("patches_replace", {}).get("dit", {})
    for block in blocks:
        current = existing.get(block)
        if isinstance(current, DitBlockPatch) and current.router is router:
            continue
        set_block_patch(DitBlockPatch(router, block, previous=current), block)
    if not find_override(transformer_options, router):
        set_override(DitAttentionOverride(router, patch_size, transformer_options.get("optimized_attention_override")))
    return router
