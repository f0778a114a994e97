"""A prompt's tokens as the CLIP that encodes it reads them: words, their positions, the end of the text.

One place for every node that addresses prompt tokens (Bounded Attention's
subjects, the attention-map words, Prompt-to-Prompt's alignment). Positions
index the conditioning's token axis: chunks of 77 one after the other, each
starting with the start token, so they address the cross-attention's columns.

SD1.x tokenizes with CLIP-L ("l"), SD2.x with OpenCLIP-H ("h"), SDXL with CLIP-L
and OpenCLIP-G ("l" and "g"). SDXL's two tokenizers share the BPE vocabulary and
differ only in padding (CLIP-L pads with its end token, CLIP-G with 0), so they
place the words at the same positions; both are read and must agree. Start, end
and padding tokens are the tokenizer's own (`start_token`, `end_token`,
`pad_token`), never a fixed id.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..attention_patches.words import Word, merge_sentencepiece, merge_word_pieces, phrase_positions

CLIP_KEYS = ("l", "g", "h")  # ComfyUI's tokenizer output keys of the CLIP text encoders, preferred first


@dataclass(frozen=True)
class PromptTokens:
    """One prompt, tokenized by one CLIP tokenizer (the first of `CLIP_KEYS` the CLIP has)."""

    chunks: tuple[tuple[int, ...], ...]  # token ids per 77-token chunk, start, end and padding included
    words: tuple[Word, ...]  # the prompt's words, positions over all chunks
    start_token: int | None
    end_token: int | None
    pad_token: int | None

    @property
    def tokens(self) -> int:
        """The conditioning's token count (chunks × chunk length)."""
        return sum(len(chunk) for chunk in self.chunks)

    @property
    def first_chunk(self) -> tuple[int, ...]:
        """The first chunk's ids from the start token through the end-of-text token (no padding)."""
        chunk = self.chunks[0]
        end = self.end_position
        return chunk if end is None else chunk[:end + 1]

    @property
    def end_position(self) -> int | None:
        """The position of the first chunk's end-of-text token (EOS); None for a tokenizer without one."""
        chunk = self.chunks[0]
        first = 1 if self.start_token is not None and chunk and chunk[0] == self.start_token else 0
        return next((i for i in range(first, len(chunk)) if chunk[i] == self.end_token), None)

    def text_ids(self) -> list[int]:
        """The first chunk's ids of the text itself: no start, end or padding token."""
        specials = {self.start_token, self.end_token, self.pad_token}
        return [t for t in self.first_chunk if t not in specials]


def tokenize(clip, text: str, node: str) -> PromptTokens:
    """`text` as the CLIP tokenizes it; raises ValueError naming `node` and its clip input for a non-CLIP tokenizer.

    With several CLIP tokenizers (SDXL), the first one's ids are kept and every
    one's words must sit at the same positions.
    """
    tokens = clip.tokenize(text)
    keys = [key for key in CLIP_KEYS if key in tokens]
    if not keys:
        raise ValueError(f"{node}: clip: its tokenizer ({', '.join(tokens)}) is not a CLIP tokenizer; "
                         "this node reads prompts of SD1.x, SD2.x and SDXL text encoders")
    read = [_read(getattr(clip.tokenizer, f"clip_{key}"), tokens[key]) for key in keys]
    if any((r.words, r.tokens, r.end_position) != (read[0].words, read[0].tokens, read[0].end_position)
           for r in read[1:]):
        raise ValueError(f"{node}: clip: the {' and '.join(f'CLIP-{k.upper()}' for k in keys)} tokenizations "
                         "of the prompt place its words differently")
    return read[0]


def _read(tokenizer, chunks) -> PromptTokens:
    ids = tuple(tuple(int(entry[0]) if isinstance(entry[0], int) else -1 for entry in chunk) for chunk in chunks)
    pieces, _ = _chunk_pieces(chunks, tokenizer, 0, tokenizer.start_token)
    return PromptTokens(ids, tuple(merge_word_pieces(pieces)), tokenizer.start_token, tokenizer.end_token,
                        tokenizer.pad_token)


def _chunk_pieces(chunks, tokenizer, offset: int, start_token=None) -> tuple[list[tuple[int, str]], int]:
    """(the text's `(position, piece)` pairs, the offset after the chunks): each chunk read up to its end token."""
    pieces = []
    for chunk in chunks:
        for position, entry in enumerate(chunk):
            token = entry[0]
            if position == 0 and start_token is not None and token == start_token:
                continue
            if not isinstance(token, int) or token == tokenizer.end_token:
                break  # end of this chunk's text (the rest is padding)
            pieces.append((offset + position, tokenizer.inv_vocab[token]))
        offset += len(chunk)
    return pieces, offset


def prompt_words(clip, text: str, node: str) -> tuple[list[Word], int]:
    """(the prompt's words with their token positions, the prompt's token count)."""
    prompt = tokenize(clip, text, node)
    return list(prompt.words), prompt.tokens


def one_chunk(clip, text: str, node: str, name: str) -> PromptTokens:
    """`text` tokenized, refused (naming `node` and the input `name`) when it does not fit one 77-token chunk."""
    prompt = tokenize(clip, text, node)
    if len(prompt.chunks) > 1:
        raise ValueError(f"{node}: {name}: the prompt has more than {len(prompt.chunks[0]) - 2} tokens; this node "
                         "reads prompts of one 77-token chunk")
    return prompt


def phrase_tokens(clip, prompt: PromptTokens, phrase: str, node: str, name: str) -> tuple[int, ...]:
    """The positions of `phrase` in the prompt's first chunk, token for token (its first occurrence).

    Raises ValueError naming `node`, the input `name` and the phrase when the
    prompt does not contain it word for word.
    """
    wanted = tokenize(clip, phrase, node).text_ids()
    end = prompt.end_position
    text = prompt.first_chunk[1:end]  # the words between the start and end tokens
    found = phrase_positions(text, wanted, start=1) if wanted else None
    if found is None:
        listed = ", ".join(dict.fromkeys(w.text for w in prompt.words if w.positions[0] < len(prompt.chunks[0])))
        raise ValueError(f"{node}: {name}: {phrase!r} is not in the prompt (it must appear word for word; "
                         f"the prompt's words: {listed or '(none)'})")
    return found


def dit_prompt_words(clip, text: str, family: str, node: str) -> tuple[list[Word], int]:
    """(the prompt's words with their positions among a Flux or SD3 model's text tokens, that token count).

    Flux attends to its T5 tokens (`t5xxl`); CLIP-L only gives it the pooled
    vector. SD3 attends to the CLIP-L/G tokens (77 a chunk) followed by the T5
    tokens, so a word has a position in each part. A CLIP without T5 (a small
    test encoder) is read by its CLIP positions.
    """
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
