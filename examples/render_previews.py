"""Run example workflows and write one small preview PNG per example, for the README.

    python examples/render_previews.py                          # every examples/*.json
    python examples/render_previews.py examples/X.json --out docs/images

Each preview is one row: the images the workflow loads (LoadImage), then every
image it saves or previews, in node order, scaled down to at most --width pixels
wide. Written as <out>/<example name>.png. Runs through the same in-process
ComfyUI as examples/run.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import headless

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES.parent / "docs" / "images"
GAP = 4  # white pixels between the images of a row, at their own scale


def tile(images: list, width: int):
    """One row of PIL images (the height of the tallest), white gaps, at most `width` pixels wide."""
    from PIL import Image

    height = max(img.height for img in images)
    row = Image.new("RGB", (sum(img.width for img in images) + GAP * (len(images) - 1), height), "white")
    x = 0
    for img in images:
        row.paste(img.convert("RGB"), (x, (height - img.height) // 2))
        x += img.width + GAP
    if row.width > width:
        row = row.resize((width, max(1, round(height * width / row.width))), Image.LANCZOS)
    return row


def preview_images(host: headless.Host, workflow: dict, outputs: dict) -> list:
    """The workflow's loaded input images, then its output images, as PIL images."""
    import folder_paths
    from PIL import Image

    nodes = workflow["nodes"] if "nodes" in workflow else [
        {"id": key, "type": node["class_type"], "widgets_values": [node["inputs"].get("image")]}
        for key, node in workflow.items()]
    inputs = [Image.open(folder_paths.get_annotated_filepath(node["widgets_values"][0]))
              for node in sorted(nodes, key=lambda n: int(n["id"])) if node["type"] == "LoadImage"]
    folders = {"output": host.output_dir, "temp": Path(folder_paths.get_temp_directory())}
    saved = [Image.open(folders[img.get("type", "output")] / img.get("subfolder", "") / img["filename"])
             for _, out in sorted(outputs.items(), key=lambda item: int(item[0]))
             for img in out.get("images", [])]
    return inputs + saved


def render(host: headless.Host, workflows: list[Path], out: Path, width: int = 512) -> list[Path]:
    """Run each workflow on `host` and write its preview to out/<name>.png; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in workflows:
        workflow = json.loads(path.read_text())
        images = preview_images(host, workflow, host.run(workflow))
        if not images:
            print(f"{path.name}: no image to preview", file=sys.stderr)
            continue
        target = out / f"{path.stem}.png"
        tile(images, width).save(target, optimize=True)
        print(f"{path.name}: wrote {target} ({target.stat().st_size // 1024} KiB)")
        written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="*", type=Path, help="workflow JSON files (default: every examples/*.json that runs on the demo model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for the previews (default: {DEFAULT_OUT})")
    parser.add_argument("--width", type=int, default=512, help="largest preview width in pixels (default: 512)")
    args = parser.parse_args(argv)

    root = headless.announce_comfyui()
    if root is None:
        return 2
    # the workflows' own saved images go to a scratch folder: only the previews are kept
    with tempfile.TemporaryDirectory(prefix="attention_lab_previews_") as scratch:
        host = headless.load_host(output_dir=Path(scratch))
        demo = [p for p in sorted(EXAMPLES.glob("*.json")) if not headless.needs_checkpoint(p)]
        render(host, args.workflows or demo, args.out, args.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
