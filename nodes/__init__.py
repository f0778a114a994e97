"""ComfyUI adapters: each node is a short schema plus a call into attention_patches/ or inversion/."""

from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .demo import DemoModelLoader

NODES: list[type[io.ComfyNode]] = [
    DemoModelLoader,
]


class AttentionLabExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> AttentionLabExtension:
    return AttentionLabExtension()
