"""Segmentation and labels on planted attention: known groups, known words."""

import pytest
import torch
from attention_lab.attention_patches import AttentionRouter, sdpa_attention
from attention_lab.attention_patches.recorder import CROSS, SELF, AttentionRecorder
from attention_lab.attention_patches.segmentation import (
    BACKGROUND,
    describe_labels,
    fold_repeated_context,
    kmeans_segments,
    label_segments,
    normalise_word_map,
    pca_rgb,
    place_labels,
    resize_map,
    segment_masks,
    segment_memberships,
    segment_preview,
    select_words,
    smooth_labels,
    upsample_labels,
    word_maps,
    word_masks,
)
from attention_lab.attention_patches.words import Word, merge_word_pieces

GRID = (8, 8)
# Four planted objects on an 8x8 grid: irregular shapes, not aligned to quadrants.
PLANTED = torch.tensor([
    [0, 0, 0, 1, 1, 1, 1, 1],
    [0, 0, 0, 1, 1, 1, 1, 1],
    [0, 0, 2, 2, 1, 1, 1, 1],
    [0, 2, 2, 2, 2, 1, 3, 3],
    [2, 2, 2, 2, 2, 3, 3, 3],
    [2, 2, 2, 2, 3, 3, 3, 3],
    [2, 2, 2, 3, 3, 3, 3, 3],
    [2, 2, 3, 3, 3, 3, 3, 3],
])
# "a cat with sunglasses in a basket": BOS=0, a=1, cat=2, with=3, sun=4 glasses=5, in=6, a=7, basket=8, EOS=9
PIECES = [(1, "a</w>"), (2, "cat</w>"), (3, "with</w>"), (4, "sun"), (5, "glasses</w>"), (6, "in</w>"), (7, "a</w>"),
          (8, "basket</w>"), (9, ",</w>")]
WORD_OF_GROUP = {0: "cat", 1: "sunglasses", 2: "basket"}  # group 3 has no word: background
TOKENS = 12


def same_partition(a, b):
    pairs = set(zip(a.flatten().tolist(), b.flatten().tolist()))
    return len(pairs) == len(set(a.flatten().tolist())) == len(set(b.flatten().tolist()))


def planted_self_attention(noise=0.02, seed=0):
    """Each token attends (almost) uniformly to its own group's tokens."""
    groups = PLANTED.flatten()
    same = (groups[:, None] == groups[None, :]).float()
    rows = same / same.sum(-1, keepdim=True)
    rows = rows + noise * torch.rand(rows.shape, generator=torch.Generator().manual_seed(seed)) / rows.shape[0]
    return rows / rows.sum(-1, keepdim=True)


def planted_cross_attention():
    """Word w's tokens are strong on their group and weak elsewhere; function words are flat."""
    groups = PLANTED.flatten()
    cross = torch.full((groups.numel(), TOKENS), 0.02)
    cross[:, 0] = 0.5  # BOS takes most of the mass, as in real models
    for group, word in WORD_OF_GROUP.items():
        positions = {"cat": [2], "sunglasses": [4, 5], "basket": [8]}[word]
        for p in positions:
            cross[groups == group, p] = 0.3 / len(positions)
    return cross / cross.sum(-1, keepdim=True)


def test_word_pieces_merge_into_words_and_punctuation_is_dropped():
    words = merge_word_pieces(PIECES)
    assert [w.text for w in words] == ["a", "cat", "with", "sunglasses", "in", "a", "basket"]
    assert words[3] == Word("sunglasses", (4, 5))


def test_words_are_selected_with_every_occurrence_and_defaults_skip_function_words():
    words = merge_word_pieces(PIECES)
    assert select_words(words, "") == {"cat": (2,), "sunglasses": (4, 5), "basket": (8,)}
    assert select_words(words, " Cat , a") == {"cat": (2,), "a": (1, 7)}
    assert select_words(words, "cat basket") == {"cat basket": (2, 8)}


@pytest.mark.parametrize("requested", [",,,", " , ", ";", ", -"])
def test_words_that_name_no_word_are_refused_not_read_as_every_word(requested):
    with pytest.raises(ValueError, match=r"words: .* names no word .*leave it empty for every word"):
        select_words(merge_word_pieces(PIECES), requested)


def test_a_word_not_in_the_prompt_is_named_with_the_prompt_words():
    with pytest.raises(ValueError, match=r"'dog' is not in the prompt; the prompt's words are: a, cat, with, sunglasses, in, basket"):
        select_words(merge_word_pieces(PIECES), "cat, dog")


def test_kmeans_recovers_planted_groups_exactly_and_labels_them():
    labels = kmeans_segments(planted_self_attention(), GRID, clusters=4, seed=1)
    assert same_partition(labels, PLANTED)
    assert labels[0, 0] == 0 and labels.max() == 3  # renumbered in raster order
    maps = word_maps(planted_cross_attention(), GRID, select_words(merge_word_pieces(PIECES), ""))
    segment_labels = label_segments(labels, maps, threshold=0.35)
    for s in segment_labels:
        planted = int(PLANTED[labels == s.segment][0])
        assert s.word == WORD_OF_GROUP.get(planted, BACKGROUND)
        if s.word != BACKGROUND:  # the winning word's map sits at its maximum on its group, the others near 0
            assert s.score > 0.8 and all(v < 0.1 for w, v in s.scores.items() if w != s.word)
    text = describe_labels(segment_labels)
    assert text.splitlines()[0].startswith(f"0: cat {segment_labels[0].score:.2f} (cat {segment_labels[0].score:.2f}, ")


def test_labels_are_the_papers_scores():
    labels = torch.tensor([[0, 0], [1, 1]])
    maps = {"cat": torch.tensor([[4.0, 2.0], [1.0, 1.0]]), "dog": torch.tensor([[1.0, 1.0], [1.0, 3.0]])}
    got = label_segments(labels, maps, threshold=0.35)
    # normalised (m - |min|)/max: cat -> [[.75, .25], [0, 0]], dog -> [[0, 0], [0, 2/3]]
    assert got[0].scores == pytest.approx({"cat": 0.5, "dog": 0.0}) and got[0].word == "cat"
    assert got[1].scores == pytest.approx({"cat": 0.0, "dog": 1 / 3}) and got[1].word == BACKGROUND
    assert torch.allclose(normalise_word_map(torch.tensor([-1.0, 3.0])), torch.tensor([-2 / 3, 2 / 3]))


def test_cross_maps_at_a_coarser_grid_are_repeated_onto_the_cluster_grid():
    coarse = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(resize_map(coarse, (4, 4)), coarse.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(resize_map(resize_map(coarse, (4, 4)), (2, 2)), coarse)


def test_masks_partition_the_image_and_word_masks_are_unions():
    labels = kmeans_segments(planted_self_attention(), GRID, clusters=4, seed=1)
    masks = segment_masks(labels, (64, 48))
    assert masks.shape == (4, 64, 48) and torch.equal(masks.sum(0), torch.ones(64, 48))
    segment_labels = label_segments(labels, word_maps(planted_cross_attention(), GRID, select_words(merge_word_pieces(PIECES), "")))
    words = word_masks(masks, segment_labels, ["cat", "basket", "with"])
    cat_segment = int(labels[0, 0])
    assert torch.equal(words[0], masks[cat_segment]) and words[2].sum() == 0


def half_covered_object(cover: float):
    """A 1x4 grid of tokens: background, background, a token covering `cover` of an object on its right,
    the object; each attention row that of the area it covers (the edge token's a mixture)."""
    background, thing = torch.tensor([0.4, 0.4, 0.1, 0.1]), torch.tensor([0.05, 0.05, 0.3, 0.6])
    rows = torch.stack([background, background, (1 - cover) * background + cover * thing, thing])
    labels = torch.tensor([[0, 0, 0 if cover < 0.5 else 1, 1]])
    return rows, labels


@pytest.mark.parametrize("cover", [0.25, 0.5, 0.75])
def test_memberships_are_the_mixture_of_an_edge_token(cover):
    rows, labels = half_covered_object(cover)
    shares = segment_memberships(rows, labels)
    assert shares.shape == (2, 1, 4) and torch.allclose(shares.sum(0), torch.ones(1, 4), atol=1e-5)
    # the centroids are the segments' mean rows (the edge token among them): the edge token lies between
    # them and its shares rebuild its row; the pure tokens belong wholly to their own segment
    centroids = torch.stack([rows[labels[0] == s].mean(0) for s in (0, 1)])
    assert torch.allclose(shares[:, 0, 2] @ centroids, rows[2], atol=1e-3) and 0.05 < shares[1, 0, 2] < 0.95
    assert shares[1, 0].tolist() == pytest.approx([0.0, 0.0, float(shares[1, 0, 2]), 1.0], abs=1e-3)


def test_smooth_edges_cut_the_half_covered_cell_where_its_mixture_says():
    size = (4, 64)  # 16 pixels per token
    edges = []
    for cover in (0.25, 0.75):
        rows, labels = half_covered_object(cover)
        big = smooth_labels(segment_memberships(rows, labels), size)
        assert torch.equal(big[0], big[-1])  # one row of tokens: every pixel row alike
        edges.append(int((big[0] == 1).nonzero()[0]))  # the object's first pixel
        cells = upsample_labels(labels, size)
        assert int((cells[0] == 1).nonzero()[0]) in (32, 48)  # repeated cells: edges on the token grid only
    # the third token's cell is pixels 32..47: the object takes more of it the more the token covers it
    assert 32 < edges[1] < edges[0] < 48
    masks = segment_masks(labels, size, big)
    assert torch.equal(masks.sum(0), torch.ones(size))


def test_a_segment_that_lost_every_token_keeps_an_empty_share():
    rows, _ = half_covered_object(0.0)
    shares = segment_memberships(rows, torch.tensor([[0, 0, 0, 2]]))
    assert not shares.isnan().any()
    assert shares.shape == (3, 1, 4) and shares[1].sum() == 0 and shares[2, 0, 3] == pytest.approx(1.0, abs=1e-3)


def test_fold_repeated_context_adds_the_copies():
    cross = torch.arange(12.0).reshape(1, 12)
    assert torch.equal(fold_repeated_context(cross, 4), torch.tensor([[12.0, 15.0, 18.0, 21.0]]))
    with pytest.raises(ValueError, match="not the one the sampled conditioning"):
        fold_repeated_context(cross, 5)


def test_bad_cluster_counts_are_named():
    with pytest.raises(ValueError, match="segments: need between 1 and 64"):
        kmeans_segments(planted_self_attention(), GRID, clusters=65)


def test_pca_separates_the_planted_groups():
    rgb = pca_rgb(planted_self_attention(noise=0.0), GRID)
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    colours = {g: rgb[PLANTED == g] for g in range(4)}
    for c in colours.values():
        assert (c - c[0]).abs().max() < 1e-6  # one colour per group
    assert len({tuple(c[0].round(decimals=4).tolist()) for c in colours.values()}) == 4
    assert torch.equal(rgb, pca_rgb(planted_self_attention(noise=0.0), GRID))


def test_preview_draws_every_segment():
    labels = torch.tensor([[0, 1], [2, 2]])
    big = resize_map(labels.float(), (64, 64)).long()
    from attention_lab.attention_patches.segmentation import SegmentLabel

    segment_labels = [SegmentLabel(0, "cat", 0.6), SegmentLabel(1, BACKGROUND, 0.1), SegmentLabel(2, "dog", 0.9)]
    plain = segment_preview(big, segment_labels)
    over = segment_preview(big, segment_labels, image=torch.zeros(64, 64, 3))
    assert plain.shape == over.shape == (64, 64, 3) and 0 <= float(plain.min()) and float(plain.max()) <= 1
    assert (plain > 0.9).all(-1).any()  # white label text was drawn (no palette colour is that light)
    assert not torch.equal(plain, over)


def test_preview_labels_do_not_cover_each_other():
    # four thin background bands and a square: every label's deepest pixel is on the same middle rows
    labels = torch.zeros(128, 128, dtype=torch.long)
    for band in range(4):
        labels[:, band * 24:(band + 1) * 24] = band
    labels[:, 96:] = 3
    labels[48:80, 100:124] = 4
    from attention_lab.attention_patches.segmentation import SegmentLabel

    names = [SegmentLabel(s, BACKGROUND, 0.1) for s in range(4)] + [SegmentLabel(4, "square", 0.8)]
    placed = place_labels(labels.numpy(), names, lambda text: (6 * len(text), 10))
    assert [text for text, _ in placed] == [BACKGROUND] * 4 + ["square 0.80"]
    for i, (_, a) in enumerate(placed):
        assert 0 <= a[0] + 1 and a[2] - 1 <= 128 and 0 <= a[1] + 1 and a[3] - 1 <= 128
        for _, b in placed[:i]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert segment_preview(labels, names).shape == (128, 128, 3)


def test_planted_attention_through_the_recorder():
    """q/k built so that softmax attention is block-diagonal over the planted groups."""
    heads, dim = 2, 8
    groups = PLANTED.flatten()
    basis = torch.eye(dim)[:4] * 12.0  # large logits inside a group, 0 across: ≈ uniform within the group
    q = basis[groups].repeat(1, heads)[None]
    text = torch.zeros(TOKENS, dim)
    for group, word in WORD_OF_GROUP.items():
        for p in {"cat": [2], "sunglasses": [4, 5], "basket": [8]}[word]:
            text[p] = basis[group] / 2
    k_text = text.repeat(1, heads)[None]
    opts = {"n_heads": heads, "dim_head": dim, "activations_shape": [1, 4, *GRID], "cond_or_uncond": [0]}
    router = AttentionRouter([("output", 3, 0)], attention=sdpa_attention)
    recorder = router.add(AttentionRecorder())
    router.patch_for(("output", 3, 0), True)(q, q, q, opts)
    router.patch_for(("output", 3, 0), False)(q, k_text, k_text, opts)
    labels = kmeans_segments(recorder.mean(SELF, GRID)[0], GRID, clusters=4, seed=1)
    assert same_partition(labels, PLANTED)
    words = select_words(merge_word_pieces(PIECES), "")
    got = {int(PLANTED[labels == s.segment][0]): s.word
           for s in label_segments(labels, word_maps(recorder.mean(CROSS, GRID)[0], GRID, words))}
    assert got == {0: "cat", 1: "sunglasses", 2: "basket", 3: BACKGROUND}


def minority_object_rows():
    """Self-attention rows of 64 tokens, 10 of them an "object" that attends to itself, the rest to the background."""
    g = torch.Generator().manual_seed(0)
    inside = torch.zeros(64, dtype=torch.bool)
    inside[[18, 19, 20, 26, 27, 28, 34, 35, 36, 44]] = True
    rows = torch.where(inside[:, None] == inside[None, :], 3.0, 1.0) + 0.1 * torch.rand(64, 64, generator=g)
    return rows / rows.sum(-1, keepdim=True), inside


def test_pca_lights_the_minority():
    rows, inside = minority_object_rows()
    for features in (rows, -rows):  # the SVD's sign must not decide which side is bright
        rgb = pca_rgb(features, (8, 8))
        assert rgb[..., 0].flatten()[inside].min() > rgb[..., 0].flatten()[~inside].max()
