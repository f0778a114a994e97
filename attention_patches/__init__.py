"""Attention math and the router that installs it: plain torch, no ComfyUI import."""

from .backend import mask_min, merge_heads, sdpa_attention, split_heads
from .call import AttentionCall, ChunkLayout, execution_order
from .router import AttentionRouter, AttentionTechnique, LayerPatch, combine_masks, find_router, install

__all__ = [
    "AttentionCall",
    "AttentionRouter",
    "AttentionTechnique",
    "ChunkLayout",
    "LayerPatch",
    "combine_masks",
    "execution_order",
    "find_router",
    "install",
    "mask_min",
    "merge_heads",
    "sdpa_attention",
    "split_heads",
]
