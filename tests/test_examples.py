"""Every shipped example workflow runs, as users drag it into ComfyUI (UI format).

Converted to API format from the live node definitions, so a renamed input or a
changed widget order breaks this test rather than a user's graph.
"""

import json
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.json"))


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
