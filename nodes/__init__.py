"""ComfyUI adapters: each node is a short schema plus a call into attention_patches/ or inversion/."""

from __future__ import annotations

import folder_paths
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .bounded import BoundedAttentionLayout, register_editor_route
from .cross_image import CrossImageAttention
from .demo import DemoModelLoader
from .example_inputs import offer_example_inputs
from .inversion import DDIMInversionSampler, DDIMInvert, InversionReplay
from .plug_and_play import PlugAndPlay
from .prompt_to_prompt import PromptToPromptBlendMask, PromptToPromptEdit, PromptToPromptEditInversion
from .style_aligned import SharedAttentionStyleAlign, StyleAlignedReferenceFromInversion
from .segment import AttentionRecorderNode, CrossAttnHeatmap, RecordAttentionPass, SelfAttnPCA, SelfAttnSegment

NODES: list[type[io.ComfyNode]] = [
    DemoModelLoader,
    BoundedAttentionLayout,
    CrossImageAttention,
    PromptToPromptEdit, PromptToPromptEditInversion, PromptToPromptBlendMask,
    PlugAndPlay,
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
    # Here, not at import: only ComfyUI loading the pack should write into its input folder,
    # never a tool or test importing these modules.
    offer_example_inputs(folder_paths.get_input_directory())
    return AttentionLabExtension()
