"""Test wiring.

`examples/headless.py` is the pack's one loader. Importing it makes this repo
the package `attention_lab`: core tests import `attention_lab.attention_patches`,
`attention_lab.inversion` and `attention_lab.demo` with no ComfyUI. Host tests
take the `host` fixture: a real ComfyUI with this pack loaded as ComfyUI loads
it (or a skip that prints why there is none), and get the pack's modules from
`host.module("nodes.segment")`; those are the very modules the core tests
imported, so objects pass between them. `tiny` is tests/tiny_models.py, the
small seeded-random models host tests and benchmarks build; `tiny_dit` is tests/tiny_dit.py (Flux, SD3).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))  # shared test helpers (attention_reference, tiny_models)

import headless  # noqa: E402

COMFY_ROOT, COMFY_HOW = headless.find_comfyui()


def pytest_report_header(config):
    return f"ComfyUI host: {COMFY_HOW}" if COMFY_ROOT else f"ComfyUI host: none ({COMFY_HOW}); host tests will skip"


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    if COMFY_ROOT is None:
        print(f"host tests skipped: {COMFY_HOW}")
        pytest.skip(COMFY_HOW)
    return headless.load_host(cpu=True, output_dir=tmp_path_factory.mktemp("comfy_output"))


@pytest.fixture(scope="session")
def tiny(host):
    import tiny_models

    return tiny_models


@pytest.fixture(scope="session")
def tiny_dit(host):
    import tiny_dit

    return tiny_dit


@pytest.fixture(scope="session")
def demo_model(host):
    """(MODEL, CLIP, VAE) of the shipped demo model, as DemoModelLoader gives them."""
    return host.module("nodes.demo").DemoModelLoader.execute().result
