"""AttentionRecorder and the map readers on Flux and SD3 (recording: attention_patches/dit_recorder.py).

Recording: every joint block (SD3.5: and its image self-attentions) at the one token grid a
DiT has (latent / patch size), the conditional rows, the selected steps. Reading: the cross
maps' keys are the text tokens the model attended to, and which tokenizer placed the words
there depends on the family:

- Flux: its T5 tokens (`t5xxl`, padded to 256 or 512); CLIP-L only gives the pooled vector.
- SD3: the CLIP-L/G tokens (77 a chunk) followed by the T5 tokens, so a word has a position
  in each part, and its map is the sum of both (as every occurrence of a word counts).

A CLIP whose tokenizer has no T5 (e.g. a small test encoder) is read by its CLIP positions.
"""

from __future__ import annotations

import re

from ..attention_patches.dit_recorder import DitAttentionRecorder
from ..attention_patches.recorder import RecordSelection
from ..attention_patches.segmentation import Word, merge_word_pieces
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


def merge_sentencepiece(pieces: list[tuple[int, str]]) -> list[Word]:
    """Words from SentencePiece pieces `(position, piece)`: a piece starting with `▁` starts a word."""
    words, text, positions = [], "", []

    def flush():
        if positions and re.search(r"\w", text):
            words.append(Word(text.lower(), tuple(positions)))

    for position, piece in pieces:
        if piece.startswith("▁"):
            flush()
            text, positions = "", []
            piece = piece[1:]
        text += piece
        positions.append(position)
    flush()
    return words


def _chunk_pieces(chunks, tokenizer, offset: int, start_token=None) -> tuple[list[tuple[int, str]], int]:
    pieces = []
    for chunk in chunks:
        for position, entry in enumerate(chunk):
            token = entry[0]
            if position == 0 and start_token is not None and token == start_token:
                continue
            if not isinstance(token, int) or token == tokenizer.end_token:
                break
            pieces.append((offset + position, tokenizer.inv_vocab[token]))
        offset += len(chunk)
    return pieces, offset


def dit_prompt_words(clip, text: str, family: str, node: str) -> tuple[list[Word], int]:
    """(the prompt's words with their positions among the model's text tokens, that token count)."""
    tokens = clip.tokenize(text)
    words, offset = [], 0
    clip_keys = [key for key in ("l", "g") if key in tokens]
    use_clip = family == "sd3" or "t5xxl" not in tokens
    if use_clip:
        if not clip_keys:
            raise ValueError(f"{node}: clip: its tokenizer ({', '.join(tokens)}) has no CLIP tokenizer; use the "
                             f"text encoder that encoded the prompt for this {family} model")
        key = clip_keys[0]
        tokenizer = getattr(clip.tokenizer, f"clip_{key}")
        pieces, offset = _chunk_pieces(tokens[key], tokenizer, 0, tokenizer.start_token)
        words += merge_word_pieces(pieces)
    if "t5xxl" in tokens:
        tokenizer = clip.tokenizer.t5xxl
        pieces, offset = _chunk_pieces(tokens["t5xxl"], tokenizer, offset)
        words += merge_sentencepiece(pieces)
    return words, offset
