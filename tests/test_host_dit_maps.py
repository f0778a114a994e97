"""AttentionRecorder, CrossAttnHeatmap, SelfAttnSegment and SelfAttnPCA on tiny Flux and SD3 models."""


import pytest
import torch

STEPS = 3


@pytest.fixture(scope="module")
def segment(host):
    return host.module("nodes.segment")


@pytest.fixture(scope="module")
def token_helper(host):
    return host.module("nodes.tokens")


@pytest.fixture(scope="module", params=["flux", "sd3"])
def family(request, tiny_dit):
    name = request.param
    model = tiny_dit.model(name, seed=3)
    return name, model


def encode(clip, text, flux):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    extra = {"pooled_output": pooled}
    if flux:
        extra["guidance"] = 3.5
    return [[cond, extra]], [[torch.zeros_like(cond), dict(extra, pooled_output=torch.zeros_like(pooled))]]


def sample(model, positive, negative, cfg=3.0, batch=2):
    import comfy.sample

    noise = torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(11))
    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def test_record_is_the_joint_attention_blocks(family, segment, host, tiny_dit):
    name, model = family
    clip = tiny_dit.text_encoder(seed=1)
    positive, negative = encode(clip, "a red circle and a blue square", name == "flux")
    patched, record = segment.AttentionRecorderNode.execute(model, 0, False, 0.0, 1.0).result
    router = host.module("nodes.patching").router_of(patched)
    captured = []

    class Capture(host.module("attention_patches").AttentionTechnique):
        families = frozenset({"flux", "sd3"})
        order = 0

        def __call__(self, q, k, v, call, attend, mask=None):
            captured.append((call, q, k))
            return attend(q, k, v, mask)

    router.add(Capture())
    plain = sample(model, positive, negative)
    out = sample(patched, positive, negative)
    assert (out - plain).abs().max() <= 1e-6  # recording changes nothing
    grid = (8, 8)
    assert record.grids("self") == [grid] and record.grids("cross") == [grid]
    joint = [c for c, _, _ in captured if c.joint]
    assert record.count("self", grid) == len(router.layers) * STEPS  # cond rows only, one chunk per call
    assert record.count("cross", grid) == len(joint)
    self_map, cross_map = record.mean("self", grid), record.mean("cross", grid)
    text = positive[0][0].shape[1]
    assert self_map.shape == (2, 64, 64) and cross_map.shape == (2, 64, text)
    assert torch.allclose(self_map.sum(-1), torch.ones(2, 64), atol=1e-4)
    assert torch.allclose(cross_map.sum(-1), torch.ones(2, 64), atol=1e-4)
    # the cross map is the text-key block of the joint attention of the conditional rows, renormalised
    expected = torch.zeros(2, 64, text)
    for call, q, k in captured:
        if not call.joint:
            continue
        rows = call.layout.rows(cond=True)
        heads = call.heads
        qi = q[rows][:, call.image_tokens].reshape(2, 64, heads, -1).transpose(1, 2).double()
        kt = k[rows][:, :text].reshape(2, text, heads, -1).transpose(1, 2).double()
        probs = (qi @ kt.transpose(-1, -2) / qi.shape[-1] ** 0.5).softmax(-1)
        expected += probs.mean(1).float()
    assert torch.allclose(cross_map, expected / len(joint), atol=1e-4)


def test_heatmap_segments_and_pca_read_a_dit_record(family, segment, tiny_dit):
    name, model = family
    clip = tiny_dit.text_encoder(seed=1)
    text = "a red circle and a blue square"
    positive, negative = encode(clip, text, name == "flux")
    patched, record = segment.AttentionRecorderNode.execute(model, 0, False, 0.0, 1.0).result
    out = sample(patched, positive, negative)
    latent = {"samples": out}
    image = torch.rand(2, 128, 128, 3)
    overlays, maps = segment.CrossAttnHeatmap.execute(record, clip, text, "circle, square", image, 0, 0.6,
                                                      latent).result
    assert overlays.shape == (4, 128, 128, 3) and maps.shape == (4, 128, 128)
    masks, word_masks, labels, preview = segment.SelfAttnSegment.execute(
        record, clip, text, "circle, square", 3, 0, 0, 0.35, 1, latent, image).result
    assert masks.shape == (6, 128, 128) and torch.allclose(masks.reshape(2, 3, -1).sum(1), torch.ones(2, 128 * 128))
    pca = segment.SelfAttnPCA.execute(record, 0, latent, image).result[0]
    assert pca.shape == (2, 128, 128, 3)


def test_too_large_a_record_is_refused_before_sampling(family, segment, tiny_dit, monkeypatch):
    import comfy.model_management

    name, model = family
    positive, negative = tiny_dit.conds(seed=5, flux=name == "flux")
    patched, record = segment.AttentionRecorderNode.execute(model, 0, False, 0.0, 1.0).result
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: 1000)
    with pytest.raises(ValueError, match="AttentionRecorder: max_resolution: recording the 8x8 attention maps"):
        sample(patched, positive, negative)


class FakeClip:
    """The parts of a ComfyUI CLIP the word mapping reads, over the host's real Flux / SD3 tokenizers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)


def test_words_are_found_at_their_t5_and_clip_positions(token_helper):
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    text = "a red circle and sunglasses"
    flux = FakeClip(comfy.text_encoders.flux.FluxTokenizer())
    words, tokens = token_helper.dit_prompt_words(flux, text, "flux", "CrossAttnHeatmap")
    t5 = [entry[0] for entry in flux.tokenize(text)["t5xxl"][0]]
    assert tokens == len(t5)  # Flux attends to the T5 tokens only, padding included
    by_text = {w.text: w.positions for w in words}
    assert list(by_text) == ["a", "red", "circle", "and", "sunglasses"]
    vocab = flux.tokenizer.t5xxl.inv_vocab
    assert "".join(vocab[t5[p]] for p in by_text["sunglasses"]).replace("▁", "") == "sunglasses"

    sd3 = FakeClip(comfy.text_encoders.sd3_clip.SD3Tokenizer())
    words, tokens = token_helper.dit_prompt_words(sd3, text, "sd3", "CrossAttnHeatmap")
    tokenized = sd3.tokenize(text)
    clip_tokens = sum(len(c) for c in tokenized["l"])
    assert tokens == clip_tokens + sum(len(c) for c in tokenized["t5xxl"])
    red = [w.positions for w in words if w.text == "red"]
    assert len(red) == 2 and red[0][0] < clip_tokens <= red[1][0]  # once among the CLIP tokens, once among T5's
