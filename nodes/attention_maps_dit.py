"""AttentionRecorder on Flux and SD3 (recording: attention_patches/dit_recorder.py).

Every joint block (SD3.5: and its image self-attentions) at the one token grid a DiT
has (latent / patch size), the conditional rows, the selected steps. The readers place
the prompt's words among the text keys with `nodes/tokens.py` (`dit_prompt_words`):
on SD3 a word has a position in the CLIP part and one in the T5 part, and its map is
the sum of both (as every occurrence of a word counts).
"""

from __future__ import annotations

from ..attention_patches.dit_recorder import DitAttentionRecorder
from ..attention_patches.recorder import RecordSelection
from .patching import attach_router

PATCH_HALVINGS = 1  # a DiT's 2×2 patches: its token grid is the latent halved once


def add_dit_recorder(model, family: str, max_resolution: int, start: float, end: float, node: str):
    """(the patched clone, the recorder, the layers' halvings for the memory check)."""
    patched = model.clone()
    router = attach_router(patched, node=node, families=("flux", "sd3"))
    try:
        selection = RecordSelection(layers=frozenset(router.layers),
                                    max_tokens=max_resolution * max_resolution if max_resolution else None,
                                    start=start, end=end)
    except ValueError as error:
        raise ValueError(f"{node}: {error}") from error
    recorder = router.add(DitAttentionRecorder(selection, family))
    return patched, recorder, {layer: PATCH_HALVINGS for layer in router.layers}
