"""Every shipped example workflow runs, as users drag it into ComfyUI (UI format).

Converted to API format from the live node definitions, so a renamed input or a
changed widget order breaks this test rather than a user's graph.
"""

import json
from pathlib import Path

import pytest

import headless

# Examples for a user's checkpoint (Flux, SD3) run on tiny models in test_host_dit_examples.py.
EXAMPLES = [p for p in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.json"))
            if not headless.needs_checkpoint(p)]


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_executes(host, path):
    workflow = json.loads(path.read_text())
    assert "nodes" in workflow and "links" in workflow, f"{path.name} must be a UI-format workflow"
    used = {node["type"] for node in workflow["nodes"]}
    unknown = used - set(host.object_info)
    assert not unknown, f"{path.name} uses nodes that neither ComfyUI nor this pack provides: {unknown}"
    outputs = host.run(workflow)
    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert images, f"{path.name} saved no image"
    for img in images:
        assert (host.output_dir / img["subfolder"] / img["filename"]).is_file()


def _prompts_and_images(workflow: dict) -> tuple[list[str], list[str]]:
    prompts = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CLIPTextEncode"]
    images = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadImage"]
    return prompts, images


@pytest.mark.parametrize("name", ["invert_reconstruct.json"])
def test_example_input_is_the_world_scene_its_prompt_describes(name):
    """The image a reconstruction example inverts is a demo-world scene (the detectors are exact on renders) and
    its prompt names exactly what is in it: any other image starts from the VAE's failure, not the inversion's."""
    import numpy as np
    from PIL import Image

    from attention_lab.demo import detect, world

    root = Path(__file__).resolve().parents[1] / "examples"
    prompts, images = _prompts_and_images(json.loads((root / name).read_text()))
    assert len(images) == 1, images
    pixels = np.asarray(Image.open(root / "inputs" / images[0]).convert("RGB"))
    found = detect.detect(pixels)
    described = [world.parse_caption(p) for p in prompts if p.strip()]
    objects, style, background = described[0]
    assert len(described) == 1, prompts
    assert sorted((o.color, o.shape) for o in found.objects) == sorted(objects), (found.objects, prompts)
    assert (found.style, found.background_color) == (style, background)
