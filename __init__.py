"""Attention Lab: research-grade attention control for ComfyUI graphs.

ComfyUI loads this package from `custom_nodes/` and calls `comfy_entrypoint`.
"""

import importlib.util
import logging

MIN_COMFYUI = (0, 3, 64)  # also [tool.comfy] requires-comfyui in pyproject.toml

# Runtime dependencies some nodes need; ComfyUI must start without them.
_DEPENDENCIES = {"sklearn": "scikit-learn", "scipy": "scipy", "PIL": "pillow", "numpy": "numpy"}

_log = logging.getLogger("attention_lab")


def _check_environment() -> None:
    missing = [pip for module, pip in _DEPENDENCIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        _log.warning(
            "[Attention Lab] missing %s: nodes that need it will fail when run; install with "
            "`pip install -r requirements.txt` in this pack's folder",
            ", ".join(missing),
        )
    try:
        from comfyui_version import __version__
    except ImportError:
        return
    version = tuple(int(part) for part in __version__.split(".")[:3] if part.isdigit())
    if version < MIN_COMFYUI:
        _log.warning(
            "[Attention Lab] needs ComfyUI >= %s, found %s: update ComfyUI",
            ".".join(map(str, MIN_COMFYUI)), __version__,
        )


_check_environment()

# Imported outside ComfyUI (pytest collecting this folder, tooling), there are
# no nodes to offer; attention_patches/ and inversion/ still import alone.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: E402

    __all__ = ["comfy_entrypoint"]
