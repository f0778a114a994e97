"""ComfyUI adapters: each node is a short schema plus a call into attention_patches/ or inversion/."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .bounded import BoundedAttentionLayout, register_editor_route
from .cross_image import CrossImageAttention
from .demo import DemoModelLoader
from .inversion import DDIMInversionSampler, DDIMInvert, InversionReplay
from .style_aligned import SharedAttentionStyleAlign, StyleAlignedReferenceFromInversion
from .segment import AttentionRecorderNode, CrossAttnHeatmap, RecordAttentionPass, SelfAttnPCA, SelfAttnSegment

NODES: list[type[io.ComfyNode]] = [
    DemoModelLoader,
    BoundedAttentionLayout,
    CrossImageAttention,
    SharedAttentionStyleAlign, StyleAlignedReferenceFromInversion,
    DDIMInvert, DDIMInversionSampler, InversionReplay,
    AttentionRecorderNode, RecordAttentionPass, SelfAttnSegment, CrossAttnHeatmap, SelfAttnPCA,
]


class AttentionLabExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> AttentionLabExtension:
    register_editor_route()
    return AttentionLabExtension()
