"""The Flux and SD3 examples, as users open them, executed with tiny random models swapped in for the checkpoint.

The workflow is the shipped file converted from the UI format; only the checkpoint
loader is replaced (by a test node with the same outputs and widget, returning the tiny
models of tests/tiny_dit.py), and the latent and step count are made small for the CPU.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headless

EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.json")
                  if headless.needs_checkpoint(p))
TINY_LOADER = "AttentionLabTestTinyDiTCheckpoint"


def test_the_checkpoint_examples_are_the_dit_ones():
    assert [p.name for p in EXAMPLES] == ["style_aligned_flux.json", "style_aligned_sd3.json"]


@pytest.fixture(scope="module")
def tiny_loader(host):
    import nodes
    import tiny_dit

    class TinyDiTCheckpoint:
        """CheckpointLoaderSimple's sockets over tiny random models: Flux for a flux* name, SD3 otherwise."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"ckpt_name": ("STRING", {"default": ""})}}

        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"
        CATEGORY = "testing"

        def load(self, ckpt_name):
            model = tiny_dit.flux_model(seed=2) if ckpt_name.startswith("flux") else tiny_dit.sd3_model(seed=2)
            return model, tiny_dit.text_encoder(seed=1), tiny_dit.taesd16_vae(seed=1)

    nodes.NODE_CLASS_MAPPINGS[TINY_LOADER] = TinyDiTCheckpoint
    host._object_info = None  # re-read the node definitions, with the test node
    yield TINY_LOADER
    del nodes.NODE_CLASS_MAPPINGS[TINY_LOADER]
    host._object_info = None


def small(workflow: dict) -> dict:
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["type"] = TINY_LOADER
        elif node["type"] == "EmptySD3LatentImage":
            node["widgets_values"] = [128, 128, node["widgets_values"][2]]
        elif node["type"] == "KSampler":
            node["widgets_values"][2] = 4  # steps
    return workflow


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_dit_example_executes_with_style_aligned(host, tiny_loader, path):
    workflow = json.loads(path.read_text())
    assert "nodes" in workflow and "links" in workflow, f"{path.name} must be a UI-format workflow"
    styled = {n["id"] for n in workflow["nodes"] if n["type"] == "SharedAttentionStyleAlign"}
    assert styled, f"{path.name} has no SharedAttentionStyleAlign node"
    outputs = host.run(small(workflow))
    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert len(images) == 4
    pixels = [np.asarray(Image.open(host.output_dir / i["subfolder"] / i["filename"])) for i in images]
    assert all(p.shape == (128, 128, 3) for p in pixels)
    # The patched model ran: its router holds the DiT StyleAligned technique on the family's default blocks.
    model = host.node_output(str(next(iter(styled))))[0][0]

    patching = host.module("nodes.patching")
    router = patching.router_of(model)
    assert router.family == ("flux" if "flux" in path.stem else "sd3")
    technique = [t for t in router.techniques if t.name == "SharedAttentionStyleAlign"][0]
    if router.family == "flux":
        assert {layer[0] for layer in technique.layers} == {"single_block"}
    assert not np.array_equal(pixels[0], pixels[1])
