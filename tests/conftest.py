"""Test wiring.

Core tests import `attention_lab.attention_patches` / `attention_lab.inversion`
(an alias of this repo that does not run the ComfyUI-facing `__init__`). Host
tests take the `host` fixture: a real ComfyUI with this pack loaded as
ComfyUI loads it, or a skip that prints why there is none.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (attention_reference)

if "attention_lab" not in sys.modules:
    _pkg = types.ModuleType("attention_lab")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["attention_lab"] = _pkg

import headless  # noqa: E402

COMFY_ROOT, COMFY_HOW = headless.find_comfyui()


def pytest_report_header(config):
    return f"ComfyUI host: {COMFY_HOW}" if COMFY_ROOT else f"ComfyUI host: none ({COMFY_HOW}); host tests will skip"


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    if COMFY_ROOT is None:
        print(f"host tests skipped: {COMFY_HOW}")
        pytest.skip(COMFY_HOW)
    return headless.Host(COMFY_ROOT, output_dir=tmp_path_factory.mktemp("comfy_output"))


@pytest.fixture(scope="session")
def pack(host):
    """This pack's package as ComfyUI loaded it (its nodes, patching, tiny models)."""
    return host.pack


@pytest.fixture(scope="session")
def tiny(pack):
    return pack.nodes.tiny_models
