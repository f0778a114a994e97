"""Run example workflows headlessly in ComfyUI and write their images.

    python examples/run.py                       # the demo default: txt2img_demo.json
    python examples/run.py examples/X.json --out out/

Finds ComfyUI like the tests do (COMFYUI_PATH, the ComfyUI holding this pack in
custom_nodes/, ~/comfy/ComfyUI), loads this pack into it and executes the
workflow files (UI format, as dragged into ComfyUI, or API format) through
ComfyUI's own executor on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import headless

DEFAULT = Path(__file__).resolve().parent / "txt2img_demo.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflows", nargs="*", type=Path, default=[DEFAULT], help="workflow JSON files (default: the demo)")
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the images (default: ./out)")
    args = parser.parse_args(argv)

    root = headless.announce_comfyui()
    if root is None:
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    host = headless.load_host(output_dir=args.out.resolve())
    for path in args.workflows:
        outputs = host.run(json.loads(path.read_text()))
        images = [img for out in outputs.values() for img in out.get("images", [])]
        for img in images:
            print(f"{path.name}: wrote {host.output_dir / img.get('subfolder', '') / img['filename']}")
        if not images:
            print(f"{path.name}: ran (no images saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
