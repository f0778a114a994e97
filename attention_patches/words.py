"""Prompt words and their token positions: plain lists, no tokenizer (nodes/tokens.py reads the CLIP's).

A prompt's tokens come in as `(position, BPE piece)` pairs; `merge_word_pieces`
makes words of them, each with every position it covers. The techniques then
ask for the positions of a word (`word_positions`), of a phrase that must
appear token for token (`phrase_positions`), or of the prompt's function words
(`FUNCTION_WORDS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

# The closed-class English words, by the word class a part-of-speech tagger gives
# them (Penn Treebank tags in brackets). Bounded Attention's authors close the
# tokens of the classes in `FILTER_CLASSES` (their NLTK `FILTER_TAGS`, with
# left/right/top/bottom forced to IN); segment labels skip every class, since
# local-prompt-mixing labels with nouns only.
CLOSED_CLASSES = {
    "determiner": "a an the this that these those some any each every either neither no all both half such "
                  "what which whose",  # DT, PDT, WDT, WP
    "conjunction": "and or but nor so yet plus",  # CC
    "preposition": "of in on at by for with from to into onto upon over under above below behind beside besides "
                   "between among near through across along around against toward towards about after before "
                   "during inside outside within without beneath underneath next than as like via per off out up "
                   "down left right top bottom",  # IN, TO, RP
    "pronoun": "i me my mine you your yours he him his she her hers it its we us our ours they them their theirs "
               "there here",  # PRP, PRP$, EX
    "modal": "can could may might must shall should will would",  # MD
    "number": "one two three four five six seven eight nine ten eleven twelve",  # CD (and every digit string)
    "auxiliary": "is are was were be been being",  # VB*: verbs to a tagger, so the authors keep them open
    "adverb": "not very",  # RB: likewise
}
FILTER_CLASSES = frozenset({"determiner", "conjunction", "preposition", "pronoun", "modal", "number"})
_CLASS_OF = {word: name for name, words in CLOSED_CLASSES.items() for word in words.split()}
FUNCTION_WORDS = frozenset(_CLASS_OF)


def is_function_word(word: str, classes=frozenset(CLOSED_CLASSES)) -> bool:
    """Whether `word` belongs to one of `classes` (default: every closed class); digit strings are numbers."""
    word = word.lower()
    return ("number" if word.isdigit() else _CLASS_OF.get(word)) in classes


@dataclass(frozen=True)
class Word:
    text: str  # as written, lower case
    positions: tuple[int, ...]  # token positions in the conditioning's token axis


def merge_word_pieces(pieces: list[tuple[int, str]]) -> list[Word]:
    """Words from BPE pieces `(position, piece)`; a piece ending in `</w>` ends a word.

    CLIP's BPE writes the end of a word as `</w>`, so "sunglasses" ->
    `sun`, `glasses</w>` becomes one word with both positions. Pieces with no
    letter or digit (punctuation) are dropped.
    """
    words, text, positions = [], "", []
    for position, piece in pieces:
        end = piece.endswith("</w>")
        text += piece[: -len("</w>")] if end else piece
        positions.append(position)
        if end:
            if re.search(r"\w", text):
                words.append(Word(text.lower(), tuple(positions)))
            text, positions = "", []
    if positions and re.search(r"\w", text):
        words.append(Word(text.lower(), tuple(positions)))
    return words


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


def missing_words(words: Sequence[Word], entry: str) -> list[str]:
    """The words of `entry` (split at non-word characters, lower case) that are not among `words`."""
    present = {w.text for w in words}
    return [part for part in re.findall(r"\w+", entry.lower()) if part not in present]


def word_positions(words: Sequence[Word], entry: str) -> tuple[int, ...]:
    """Every position of every word of `entry` (several words allowed), sorted; () if one of them is missing."""
    parts = re.findall(r"\w+", entry.lower())
    if not parts or missing_words(words, entry):
        return ()
    return tuple(sorted({p for w in words if w.text in parts for p in w.positions}))


def phrase_positions(ids: Sequence[int], phrase: Sequence[int], start: int = 0) -> tuple[int, ...] | None:
    """The positions of the first occurrence of the token sequence `phrase` in `ids` (offset by `start`); None: absent."""
    n = len(phrase)
    for i in range(len(ids) - n + 1):
        if n and list(ids[i:i + n]) == list(phrase):
            return tuple(start + i + j for j in range(n))
    return None
