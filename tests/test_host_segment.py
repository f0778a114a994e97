"""Recording and segmentation inside real ComfyUI sampling, on tiny SD1.5 and SDXL models."""

from types import SimpleNamespace

import pytest
import torch

STEPS = 3
PROMPT = "a cat wearing sunglasses in a wicker basket"


@pytest.fixture(scope="module")
def seg(host):
    return host.module("nodes.segment")


@pytest.fixture(scope="module")
def clip(tiny):
    return tiny.text_encoder(seed=1)


def encode(clip, text):
    import nodes

    return nodes.CLIPTextEncode().encode(clip, text)[0]


def sdxl_conds(tiny, cond):
    extra = {"pooled_output": torch.zeros(1, tiny.SDXL_POOLED), "width": 128, "height": 128}
    return [[cond, dict(extra)]], [[torch.zeros_like(cond), dict(extra)]]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request, tiny, clip):
    model = {"sd15": tiny.sd15_unet, "sdxl": tiny.sdxl_unet}[request.param](seed=3)
    positive, negative = encode(clip, PROMPT), encode(clip, "")
    if request.param == "sdxl":
        positive, _ = sdxl_conds(tiny, positive[0][0])
        negative, _ = sdxl_conds(tiny, negative[0][0])
    return request.param, model, positive, negative


def sample(model, positive, negative, cfg=5.0, batch=2, seed=11):
    import comfy.sample

    noise = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, STEPS, cfg, "euler", "normal", positive, negative,
                               torch.zeros_like(noise), seed=0, disable_pbar=True)


def recorded(seg, model, **options):
    settings = {"max_resolution": 32, "include_middle": False, "start_percent": 0.0, "end_percent": 1.0}
    settings.update(options)
    return seg.AttentionRecorderNode.execute(model, **settings).args


def separate_calls(model):
    m = model.clone()
    m.add_object_patch("memory_required", lambda *args, **kwargs: 1e30)
    return m


@pytest.fixture(scope="module")
def runs(family, seg):
    """One plain and one recorded sampling run per model family, shared by the tests below."""
    name, model, positive, negative = family
    batch = {"sd15": 2, "sdxl": 1}[name]  # two images where it is cheap, to check they are kept apart
    reference = sample(model, positive, negative, batch=batch)
    patched, record = recorded(seg, model)
    out = sample(patched, positive, negative, batch=batch)
    return name, reference, out, record


def test_recording_leaves_the_sample_unchanged_and_records_every_step(runs):
    name, reference, out, record = runs
    assert (out - reference).abs().max() <= 1e-6
    assert record.steps == set(range(STEPS)) and record.belongs_to(out) and record.runs == 1
    # tiny models at a 16x16 latent: SD1.5 attends at 16², 8², 4² (and 2² in the middle); SDXL at 8², 4²
    grids = {"sd15": [(16, 16), (8, 8), (4, 4)], "sdxl": [(8, 8), (4, 4)]}[name]
    assert record.grids("self") == grids and record.grids("cross") == grids
    layers = {"sd15": {(16, 16): 5, (8, 8): 5, (4, 4): 5}, "sdxl": {(8, 8): 10, (4, 4): 50}}[name]  # input + output layers
    for grid, count in layers.items():
        assert record.count("self", grid) == count * STEPS
        maps = record.mean("self", grid)
        assert maps.shape == (out.shape[0], grid[0] * grid[1], grid[0] * grid[1])
        assert torch.allclose(maps.sum(-1), torch.ones(maps.shape[:2]), atol=1e-4)  # rows of probabilities
    assert record.mean("cross", grids[0]).shape[-1] == 77


def test_the_record_does_not_depend_on_how_comfyui_batches_cond_and_uncond(tiny, seg, clip):
    model = tiny.sd15_unet(seed=4)
    positive, negative = encode(clip, PROMPT), encode(clip, "")
    together, a = recorded(seg, model)
    split, b = recorded(seg, separate_calls(model))
    sample(together, positive, negative, batch=1)
    sample(split, positive, negative, batch=1)
    assert a.count("self", (16, 16)) == b.count("self", (16, 16)) == 5 * STEPS
    for kind in ("self", "cross"):
        assert torch.allclose(a.mean(kind, (16, 16)), b.mean(kind, (16, 16)), atol=1e-5)


def test_recorder_survives_clones_and_resets_between_runs(tiny, seg, clip):
    model = tiny.sd15_unet(seed=5)
    before = repr(model.model_options), dict(model.wrappers)
    positive, negative = encode(clip, PROMPT), encode(clip, "")
    patched, record = recorded(seg, model)
    clone = patched.clone()
    first = sample(clone.clone(), positive, negative, seed=1)
    count = record.count("self", (16, 16))
    assert count == 5 * STEPS and record.belongs_to(first)
    second = sample(patched, positive, negative, seed=2)
    assert record.count("self", (16, 16)) == count  # a new run starts from zero, not on top of the last one
    assert record.belongs_to(second) and not record.belongs_to(first) and record.runs == 2
    assert (repr(model.model_options), dict(model.wrappers)) == before  # the base MODEL is untouched


def segment(seg, record, clip, latent=None, text=PROMPT, words="", segments=3, image=None, edges="smooth"):
    return seg.SelfAttnSegment.execute(record, clip, text, words, segments, 32, 16, 0.35, 1,
                                       latent=latent, image=image, edges=edges).args


def test_segments_partition_the_image_with_consistent_labels(runs, seg, clip):
    _, _, out, record = runs
    masks, word_masks, labels, preview = segment(seg, record, clip, {"samples": out}, words="cat, sunglasses, basket")
    images = out.shape[0]
    # one line per segment; with several images each image's lines follow an "image i:" header
    blocks = [block.strip().splitlines()[1:] for block in labels.split("image ")[1:]] if images > 1 else [labels.splitlines()]
    assert len(blocks) == images and preview.shape == (images, 128, 128, 3)
    per_image = [len(lines) for lines in blocks]
    assert all(1 <= n <= 3 for n in per_image) and masks.shape == (sum(per_image), 128, 128)
    start = 0
    for image, n in enumerate(per_image):
        own = masks[start:start + n]
        assert torch.equal(own.sum(0), torch.ones(128, 128))  # a partition
        words = [line.split()[1] for line in blocks[image]]
        assert set(words) <= {"cat", "sunglasses", "basket", "background"}
        for w, word in enumerate(["cat", "sunglasses", "basket"]):
            union = sum((own[s] for s in range(n) if words[s] == word), torch.zeros(128, 128))
            assert torch.equal(word_masks[image * 3 + w], union)
        start += n
    again = segment(seg, record, clip, {"samples": out}, words="cat, sunglasses, basket")
    assert torch.equal(again[0], masks) and again[2] == labels  # seeded KMeans: the same answer


def test_smooth_edges_keep_the_labels_and_cut_inside_the_cells_the_paper_repeats(runs, seg, clip):
    _, _, out, record = runs
    smooth = segment(seg, record, clip, {"samples": out}, words="cat, basket")
    cells = segment(seg, record, clip, {"samples": out}, words="cat, basket", edges="cells")
    assert smooth[2] == cells[2]  # the same segments and labels: only the masks' edges differ
    side = 128 // 16  # pixels per token of the 16x16 cluster grid
    blocks = cells[0].reshape(-1, 16, side, 16, side)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))  # the paper's: whole cells
    assert torch.equal(smooth[0].reshape(out.shape[0], -1, 128, 128).sum(1), torch.ones(out.shape[0], 128, 128))
    assert not torch.equal(smooth[0], cells[0])
    moved = (smooth[0] != cells[0]).float().mean()
    assert 0 < moved < 0.25  # edges move inside the cells along the borders, segments stay where they were
    with pytest.raises(ValueError, match="SelfAttnSegment: edges: expected one of smooth, cells, got 'soft'"):
        segment(seg, record, clip, {"samples": out}, edges="soft")


def test_reading_node_errors_say_what_to_do(runs, tiny, seg, clip):
    _, empty = recorded(seg, tiny.sd15_unet(seed=6))
    with pytest.raises(ValueError, match="SelfAttnSegment: the attention record is empty: no sampling with the MODEL.*LATENT"):
        segment(seg, empty, clip)
    _, _, out, record = runs
    with pytest.raises(ValueError, match="'dog' is not in the prompt; the prompt's words are: a, cat, wearing"):
        segment(seg, record, clip, {"samples": out}, words="cat, dog")
    with pytest.raises(ValueError, match="latent: the attention record belongs to another sampling result"):
        segment(seg, record, clip, {"samples": out + 0.1})
    with pytest.raises(ValueError, match="CrossAttnHeatmap: words: ',,,' names no word"):
        seg.CrossAttnHeatmap.execute(record, clip, PROMPT, ",,,", torch.zeros(2, 128, 128, 3), 16, 0.6,
                                     latent={"samples": out})
    long_prompt = ", ".join(["a cat"] * 40)  # 2 chunks of 77 tokens: not what was sampled
    with pytest.raises(ValueError, match="not the one the sampled conditioning was encoded from"):
        segment(seg, record, clip, {"samples": out}, text=long_prompt)


def test_words_map_to_tokens_for_clip_l_and_sdxl_l_and_g(seg, clip):
    import comfy.sdxl_clip

    words, tokens = seg.prompt_words(clip, "A tyrannosaurus, (wearing:1.2) sunglasses", "Test")
    assert tokens == 77
    texts = [w.text for w in words]
    assert texts == ["a", "tyrannosaurus", "wearing", "sunglasses"]
    assert words[0].positions == (1,) and len(words[1].positions) > 1  # a multi-token word, merged
    xl = comfy.sdxl_clip.SDXLTokenizer()
    xl_clip = SimpleNamespace(tokenizer=xl, tokenize=lambda text: xl.tokenize_with_weights(text))
    assert seg.prompt_words(xl_clip, "A tyrannosaurus, (wearing:1.2) sunglasses", "Test") == (words, tokens)
    long_words, long_tokens = seg.prompt_words(clip, " ".join(["cat"] * 80) + " dog", "Test")
    assert long_tokens == 154 and long_words[-1].text == "dog" and long_words[-1].positions[0] > 77


def test_real_image_pass_heatmaps_and_pca(tiny, seg, clip):
    import nodes

    model, vae = tiny.sd15_unet(seed=7), tiny.taesd_vae(seed=2)
    picture = torch.zeros(1, 128, 128, 3)
    picture[:, 32:96, 32:96] = torch.tensor([1.0, 0.2, 0.1])
    latent = nodes.VAEEncode().encode(vae, picture)[0]
    positive = encode(clip, PROMPT)
    record, passed = seg.RecordAttentionPass.execute(model, positive, latent, 0.5, 0, 32, False).args
    assert passed is latent and record.belongs_to(latent["samples"]) and record.steps == {0}
    assert record.count("self", (16, 16)) == 5  # one pass through the five 16² layers
    masks, _, _, preview = segment(seg, record, clip, passed, image=picture)
    assert torch.equal(masks.sum(0), torch.ones(128, 128)) and preview.shape == (1, 128, 128, 3)
    heat, maps = seg.CrossAttnHeatmap.execute(record, clip, PROMPT, "cat, basket", picture, 16, 0.6, latent=passed).args
    assert heat.shape == (2, 128, 128, 3) and maps.shape == (2, 128, 128)
    assert float(maps.min()) == 0.0 and float(maps.max()) == 1.0
    (pca,) = seg.SelfAttnPCA.execute(record, 32, latent=passed).args
    assert pca.shape == (1, 128, 128, 3) and 0 <= float(pca.min()) and float(pca.max()) <= 1



def test_layer_grids_are_read_from_the_unet(tiny, host):
    patching = host.module("nodes.patching")
    halvings = patching.layer_downsampling(tiny.sd15_unet(seed=3))
    assert halvings[("input", 1, 0)] == 0 and halvings[("input", 4, 0)] == 1 and halvings[("output", 11, 0)] == 0
    assert halvings[("middle", 0, 0)] == max(halvings.values()) and halvings[("output", 3, 0)] == halvings[("input", 7, 0)]


def test_a_record_that_cannot_fit_is_refused_before_sampling(tiny, seg, clip, monkeypatch):
    import comfy.model_management

    model = tiny.sd15_unet(seed=3)
    positive, negative = encode(clip, PROMPT), encode(clip, "")
    patched, record = recorded(seg, model)  # max_resolution 32: every grid of a 16² latent, 16x16 the largest
    calls = []
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 200_000)
    patched.set_model_unet_function_wrapper(lambda apply, c: calls.append(1) or apply(c["input"], c["timestep"], **c["c"]))
    with pytest.raises(ValueError, match=r"AttentionRecorder: max_resolution: recording the 16x16, 8x8, 4x4 attention maps \(max_resolution 32\) "
                                         r"for 2 image\(s\) of 128x128 px needs about .*the 16x16 self-attention map .*"
                                         r"max_resolution 8 \(0.12 MiB\) fits"):
        sample(patched, positive, negative)
    assert not calls  # refused before the first UNet call
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="RecordAttentionPass: max_resolution: .* max_resolution 8"):
        seg.RecordAttentionPass.execute(model, positive, latent, 0.5, 0, 32, False)


def test_an_empty_record_names_max_resolution_as_the_cause(tiny, seg, clip):
    model = tiny.sd15_unet(seed=3)
    patched, record = recorded(seg, model, max_resolution=1)
    out = sample(patched, encode(clip, PROMPT), encode(clip, ""), batch=1)
    with pytest.raises(ValueError, match=r"record is empty: the sampling run recorded no layer, because the recorder's "
                                         r"max_resolution \(1\) is below every attention grid .*\(16x16, 8x8, 4x4, 2x2\)"
                                         r".* max_resolution to at least 2") as refused:
        segment(seg, record, clip, {"samples": out})
    assert "cached" not in str(refused.value)


def test_auto_records_every_level_but_the_highest_and_reads_by_role(tiny, seg, clip):
    # the paper stores SD1.4's 32² and 16² levels at 512 px, not its highest (64²); on this
    # SD1.5-shaped UNet at 128 px that is 8² and 4², and the 8² level labels (4² is too coarse)
    model = tiny.sd15_unet(seed=3)
    patched, record = recorded(seg, model, max_resolution=0)
    out = {"samples": sample(patched, encode(clip, PROMPT), encode(clip, ""), batch=1)}
    assert record.grids("self") == [(8, 8), (4, 4)] and record.grids("cross") == [(8, 8), (4, 4)]
    assert record.label_grid((8, 8)) == (8, 8)
    masks, _, labels, _ = seg.SelfAttnSegment.execute(record, clip, PROMPT, "cat, basket", 3, 0, 0, 0.35, 1,
                                                      latent=out).args
    assert masks.shape == (3, 128, 128) and torch.equal(masks.sum(0), torch.ones(128, 128))
    (pca,) = seg.SelfAttnPCA.execute(record, 0, latent=out).args
    assert pca.shape == (1, 128, 128, 3)
    heat, maps = seg.CrossAttnHeatmap.execute(record, clip, PROMPT, "cat", torch.zeros(1, 128, 128, 3), 0, 0.6,
                                              latent=out).args
    assert maps.shape == (1, 128, 128)
