"""The demo world: procedurally generated scenes whose ground truth is known.

`world` renders seeded scenes (objects on styled backgrounds) with captions,
masks and boxes; `detect` finds objects and the background style in an image;
`train` trains the pack's small demo model on the world. Plain numpy/PIL apart
from `train`, which uses ComfyUI's model classes.
"""
