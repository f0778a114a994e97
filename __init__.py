"""Attention Lab: research-grade attention control for ComfyUI graphs.

ComfyUI loads this package from `custom_nodes/` and calls `comfy_entrypoint`.
"""

import importlib.util
import logging

# Runtime dependencies some nodes need; ComfyUI must start without them.
_OPTIONAL = {"sklearn": "scikit-learn", "einops": "einops", "PIL": "pillow", "numpy": "numpy"}

_missing = [pip for module, pip in _OPTIONAL.items() if importlib.util.find_spec(module) is None]
if _missing:
    logging.getLogger("attention_lab").warning(
        "[Attention Lab] missing %s: nodes that need it will fail when run; install with "
        "`pip install -r requirements.txt` in this pack's folder",
        ", ".join(_missing),
    )

# Imported outside ComfyUI (pytest collecting this folder, tooling), there are
# no nodes to offer; attention_patches/ and inversion/ still import alone.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: E402

    __all__ = ["comfy_entrypoint"]
