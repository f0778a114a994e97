"""The example workflows' input images, offered to ComfyUI's LoadImage.

LoadImage lists only the files of ComfyUI's input folder, so an example that
loads `examples/inputs/x.png` would fail right after a plain install. When the
pack loads, each of those images that the input folder lacks is copied there;
a file of the same name already there is the user's and is never replaced.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "examples" / "inputs"

_log = logging.getLogger("attention_lab")


def offer_example_inputs(input_dir: str | Path, source: Path = EXAMPLE_INPUTS) -> list[str]:
    """Copy source/*.png that `input_dir` does not have into it; return the names copied.

    Logs one line when it copies something; a failure to write is logged, never raised
    (the nodes work without the example images).
    """
    target = Path(input_dir)
    missing = [p for p in sorted(source.glob("*.png")) if not (target / p.name).exists()]
    if not missing:
        return []
    copied = []
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in missing:
            try:
                # exclusive create: a file of that name that appeared since the check stays the user's
                with open(target / path.name, "xb") as dst, open(path, "rb") as src:
                    shutil.copyfileobj(src, dst)
            except FileExistsError:
                continue
            except OSError:
                (target / path.name).unlink(missing_ok=True)  # no half-written image under the user's name
                raise
            copied.append(path.name)
    except OSError as exc:
        _log.warning("[Attention Lab] could not copy the example input images into %s (%s): the example "
                     "workflows' LoadImage will not find them; copy %s there by hand", target, exc, source)
        return copied
    if not copied:
        return copied
    _log.info("[Attention Lab] copied %d example input image(s) into ComfyUI's input folder %s for the example "
              "workflows (LoadImage): %s", len(copied), target, ", ".join(copied))
    return copied
