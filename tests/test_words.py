"""attention_patches/words.py: the one function-word list and the word/phrase position look-ups."""

import pytest

from attention_lab.attention_patches.words import (
    CLOSED_CLASSES,
    FILTER_CLASSES,
    FUNCTION_WORDS,
    Word,
    is_function_word,
    merge_word_pieces,
    phrase_positions,
    word_positions,
)

# "a cat with sunglasses in a basket": SOT = 0, sunglasses = sun + glasses
WORDS = merge_word_pieces([(1, "a</w>"), (2, "cat</w>"), (3, "with</w>"), (4, "sun"), (5, "glasses</w>"),
                           (6, "in</w>"), (7, "a</w>"), (8, "basket</w>")])


def test_one_list_the_authors_filter_is_its_tagged_closed_classes():
    assert FUNCTION_WORDS == {w for words in CLOSED_CLASSES.values() for w in words.split()}
    # the authors' NLTK tags close determiners, prepositions (left/right/top/bottom forced to IN), numbers ...
    for word in ("the", "and", "of", "left", "bottom", "their", "there", "could", "seven", "42", "The"):
        assert is_function_word(word, FILTER_CLASSES) and is_function_word(word), word
    # ... but tag auxiliaries as verbs and not/very as adverbs: open to them, closed to segment labels
    for word in ("is", "been", "not", "very"):
        assert not is_function_word(word, FILTER_CLASSES) and is_function_word(word), word
    for word in ("cat", "ginger", "red", "sunglasses"):
        assert not is_function_word(word), word


def test_word_positions_take_every_occurrence_and_need_every_word():
    assert WORDS[3] == Word("sunglasses", (4, 5))
    assert word_positions(WORDS, "a") == (1, 7)
    assert word_positions(WORDS, "Cat basket") == (2, 8)
    assert word_positions(WORDS, "sunglasses") == (4, 5)
    assert word_positions(WORDS, "cat dog") == () and word_positions(WORDS, ",,") == ()


@pytest.mark.parametrize("phrase,expected", [([7, 8], (4, 5)), ([5], (1,)), ([5, 7], (3, 4)), ([6, 5, 7], (2, 3, 4)),
                                             ([8, 7], None), ([9], None), ([], None)])
def test_phrase_positions_are_the_first_contiguous_occurrence(phrase, expected):
    assert phrase_positions([5, 6, 5, 7, 8], phrase, start=1) == expected
