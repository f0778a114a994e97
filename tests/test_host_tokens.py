"""nodes/tokens.py, the one prompt-token helper, with ComfyUI's real SD1.x, SD2.x and SDXL tokenizers."""

from types import SimpleNamespace

import pytest

PROMPT = "a ginger kitten and a gray puppy in a yard"
NODE = "TestNode"


@pytest.fixture(scope="module")
def tokens(host):
    return host.module("nodes.tokens")


def clip_of(tokenizer):
    return SimpleNamespace(tokenizer=tokenizer, tokenize=lambda text: tokenizer.tokenize_with_weights(text))


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def clip(request, tiny):
    import comfy.sdxl_clip
    import comfy.text_encoders.sd2_clip

    if request.param == "sd15":
        return tiny.text_encoder()  # a comfy.sd.CLIP with the standard CLIP-L tokenizer
    if request.param == "sd2":
        return clip_of(comfy.text_encoders.sd2_clip.SD2Tokenizer())
    return clip_of(comfy.sdxl_clip.SDXLTokenizer())


def test_words_positions_and_end_of_text_come_from_the_tokenizer(tokens, clip):
    prompt = tokens.tokenize(clip, PROMPT, NODE)
    assert [w.text for w in prompt.words] == PROMPT.split()
    assert [w.positions for w in prompt.words] == [(i,) for i in range(1, 11)]
    assert prompt.end_position == 11 and prompt.tokens == 77 and len(prompt.first_chunk) == 12
    assert prompt.first_chunk[0] == prompt.start_token and prompt.first_chunk[-1] == prompt.end_token
    # after EOS the chunk is padding, whatever the tokenizer pads with (CLIP-L: its end token; OpenCLIP-H/G: 0)
    assert set(prompt.chunks[0][12:]) == {prompt.pad_token}
    assert tokens.phrase_tokens(clip, prompt, "gray puppy", NODE, "subjects") == (6, 7)
    assert tokens.phrase_tokens(clip, prompt, "a", NODE, "subjects") == (1,)  # the first occurrence


def test_sdxl_reads_clip_l_and_clip_g_alike_though_they_pad_differently(tokens, tiny):
    import comfy.sdxl_clip

    xl = comfy.sdxl_clip.SDXLTokenizer()
    raw = xl.tokenize_with_weights(PROMPT)
    assert raw["l"][0][20][0] == xl.clip_l.end_token and raw["g"][0][20][0] == 0 == xl.clip_g.pad_token
    sd15 = tokens.tokenize(tiny.text_encoder(), PROMPT, NODE)
    sdxl = tokens.tokenize(clip_of(xl), PROMPT, NODE)
    assert (sdxl.words, sdxl.end_position, sdxl.first_chunk) == (sd15.words, sd15.end_position, sd15.first_chunk)


def test_multi_token_words_keep_every_position(tokens, clip):
    prompt = tokens.tokenize(clip, "A tyrannosaurus, (wearing:1.2) sunglasses", NODE)
    texts = [w.text for w in prompt.words]
    assert texts == ["a", "tyrannosaurus", "wearing", "sunglasses"]
    tyrannosaurus = prompt.words[1].positions
    assert len(tyrannosaurus) > 1 and tyrannosaurus == tuple(range(2, 2 + len(tyrannosaurus)))
    assert tokens.phrase_tokens(clip, prompt, "tyrannosaurus", NODE, "subjects") == tyrannosaurus
    # the weight syntax is the tokenizer's: the phrase is found with or without it
    assert tokens.phrase_tokens(clip, prompt, "wearing sunglasses", NODE, "subjects") == (
        prompt.words[2].positions + prompt.words[3].positions)


@pytest.mark.parametrize("phrase", ["blue whale", "kitten ginger", "puppies", ""])
def test_a_phrase_absent_from_the_prompt_is_named_with_the_input(tokens, clip, phrase):
    prompt = tokens.tokenize(clip, PROMPT, NODE)
    with pytest.raises(ValueError, match=rf"^{NODE}: subjects: '{phrase}' is not in the prompt \(it must appear "
                                         r"word for word; the prompt's words: a, ginger, kitten, and, gray"):
        tokens.phrase_tokens(clip, prompt, phrase, NODE, "subjects")


def test_a_prompt_over_one_chunk_is_refused_by_one_chunk_only(tokens, clip):
    long_prompt = " ".join(["cat"] * 80) + " dog"
    words, count = tokens.prompt_words(clip, long_prompt, NODE)
    assert count == 154 and words[-1].text == "dog" and words[-1].positions[0] > 77
    with pytest.raises(ValueError, match=rf"^{NODE}: edit_prompts: the prompt has more than 75 tokens"):
        tokens.one_chunk(clip, long_prompt, NODE, "edit_prompts")
    assert tokens.one_chunk(clip, PROMPT, NODE, "edit_prompts").end_position == 11


def test_a_tokenizer_that_is_not_clip_is_refused_naming_the_clip_input(tokens):
    t5 = SimpleNamespace(tokenizer=None, tokenize=lambda text: {"t5xxl": [[(1, 1.0)]]})
    with pytest.raises(ValueError, match=rf"^{NODE}: clip: its tokenizer \(t5xxl\) is not a CLIP tokenizer"):
        tokens.tokenize(t5, PROMPT, NODE)
