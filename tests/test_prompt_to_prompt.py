"""Prompt-to-Prompt core against the authors' code (google/prompt-to-prompt), transcribed below.

The technique computes every replacement as fused attention calls; these tests
compute the probabilities explicitly, apply the authors' formulas to them and
compare the outputs on random tensors.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention_lab.attention_patches import prompt_to_prompt as p2p
from attention_lab.attention_patches import sdpa_attention
from attention_lab.attention_patches.call import AttentionCall, ChunkLayout

HEADS, DIM, K = 2, 4, 77


# --- the authors' code, transcribed (seq_aligner.py, ptp_utils.py, prompt-to-prompt_stable.ipynb) ---------------


def authors_global_align(x, y):
    gap, match, mismatch = 0, 1, -1
    matrix = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(len(y)) + 1) * gap
    matrix[1:, 0] = (np.arange(len(x)) + 1) * gap
    trace_back = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace_back[0, 1:] = 1
    trace_back[1:, 0] = 2
    trace_back[0, 0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + gap
            up = matrix[i - 1, j] + gap
            diag = matrix[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    return trace_back


def authors_get_mapper(x_seq, y_seq, max_len=77):
    trace_back = authors_global_align(x_seq, y_seq)
    i, j, mapper_y_to_x = len(x_seq), len(y_seq), []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            i, j = i - 1, j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    mapper_base = torch.tensor(mapper_y_to_x, dtype=torch.int64)
    alphas = torch.ones(max_len)
    alphas[: mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[:mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0]:] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def authors_replacement_mapper(inds_source, inds_target, max_len=77):
    """get_replacement_mapper_ from the swapped words' token indices (the tokenizer part left out)."""
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur_inds = 0
    while i < max_len and j < max_len:
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            inds_source_, inds_target_ = inds_source[cur_inds], inds_target[cur_inds]
            if len(inds_source_) == len(inds_target_):
                mapper[inds_source_, inds_target_] = 1
            else:
                ratio = 1 / len(inds_target_)
                for i_t in inds_target_:
                    mapper[inds_source_, i_t] = ratio
            cur_inds += 1
            i += len(inds_source_)
            j += len(inds_target_)
        elif cur_inds < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return torch.from_numpy(mapper).float()


def authors_replace(attn_base, att_replace, mapper):  # AttentionReplace
    return torch.einsum('hpw,bwn->bhpn', attn_base, mapper)


def authors_refine(attn_base, att_replace, mapper, alphas):  # AttentionRefine
    alphas = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])
    attn_base_replace = attn_base[:, :, mapper].permute(2, 0, 1, 3)
    return attn_base_replace * alphas + att_replace * (1 - alphas)


def authors_edit_forward(attn, batch_size, is_cross, replace_cross, alpha_words, self_active):
    """AttentionControlEdit.forward on the conditional rows `[batch*heads, N, K]`."""
    if is_cross or self_active:
        h = attn.shape[0] // batch_size
        attn = attn.reshape(batch_size, h, *attn.shape[1:])
        attn_base, attn_repalce = attn[0], attn[1:]
        if is_cross:
            attn_repalce_new = replace_cross(attn_base, attn_repalce) * alpha_words + (1 - alpha_words) * attn_repalce
            attn[1:] = attn_repalce_new
        else:
            attn[1:] = attn_base.unsqueeze(0).expand(attn_repalce.shape[0], *attn_base.shape)
        attn = attn.reshape(batch_size * h, *attn.shape[2:])
    return attn


def authors_local_blend(x_t, maps, alpha_layers, threshold=.3):
    """LocalBlend.__call__ with `maps` [prompts, heads*layers, 1, h, w, K]."""
    k = 1
    maps = (maps * alpha_layers).sum(-1).mean(1)
    mask = F.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
    mask = F.interpolate(mask, size=(x_t.shape[2:]))
    mask = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
    mask = mask.gt(threshold)
    mask = (mask[:1] + mask[1:]).float()
    return x_t[:1] + mask * (x_t - x_t[:1])


# --- helpers ----------------------------------------------------------------------------------------------------


def make_call(batch, cond_or_uncond, is_self, side, step=0, total=10, latent=16, layer=("input", 1, 0)):
    return AttentionCall(layer=layer, ordinal=0, num_layers=1, is_self=is_self, height=side, width=side, heads=HEADS,
                         dim_head=DIM, step=step, total_steps=total, sigma=1.0,
                         layout=ChunkLayout.of(batch, cond_or_uncond),
                         options={"original_shape": (batch, 4, latent, latent)})


def attend(q, k, v, mask=None):
    return sdpa_attention(q.double(), k.double(), v.double(), HEADS, mask=mask).to(q.dtype)


def probs(q, k):
    """[B, heads, N, K] float64 softmax(QKᵀ/√d)."""
    qh = q.double().view(q.shape[0], q.shape[1], HEADS, DIM).transpose(1, 2)
    kh = k.double().view(k.shape[0], k.shape[1], HEADS, DIM).transpose(1, 2)
    return (qh @ kh.transpose(-1, -2) / DIM ** 0.5).softmax(-1)


def apply_probs(p, v):
    vh = v.double().view(v.shape[0], v.shape[1], HEADS, DIM).transpose(1, 2)
    out = p @ vh
    return out.transpose(1, 2).reshape(v.shape[0], -1, HEADS * DIM)


def random_qkv(batch, n, keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, HEADS * DIM, generator=g), torch.randn(batch, keys, HEADS * DIM, generator=g),
            torch.randn(batch, keys, HEADS * DIM, generator=g))


SOURCE = [49406, 320, 736, 2802, 525, 320, 9612, 49407]  # start, "a red circle on a <x>", end
REFINED = [49406, 320, 6598, 736, 2802, 525, 320, 1400, 9612, 49407]  # two added words


# --- alignment --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_refinement_mapper_is_the_authors(seed):
    rng = np.random.default_rng(seed)
    x = [49406] + rng.integers(0, 6, rng.integers(2, 9)).tolist() + [49407]
    y = [49406] + rng.integers(0, 6, rng.integers(2, 12)).tolist() + [49407]
    mapper, alphas = p2p.refinement_mapper(x, y)
    ref_mapper, ref_alphas = authors_get_mapper(x, y)
    assert torch.equal(mapper, ref_mapper) and torch.equal(alphas, ref_alphas)


def test_replacement_mapper_is_the_authors_for_equal_token_counts():
    source = [("a", (1,)), ("red", (2,)), ("circle", (3,)), ("on", (4,)), ("stripes", (5,))]
    edit = [("a", (1,)), ("blue", (2,)), ("square", (3,)), ("on", (4,)), ("stripes", (5,))]
    got = p2p.replacement_mapper(source, edit)
    assert torch.equal(got, authors_replacement_mapper([[2], [3]], [[2], [3]]))
    assert torch.equal(got, torch.eye(K))


def test_replacement_mapper_fans_a_longer_word_out_and_keeps_later_tokens_aligned():
    source = [("a", (1,)), ("cat", (2,)), ("on", (3,)), ("grass", (4,))]
    edit = [("a", (1,)), ("tabby", (2, 3)), ("on", (4,)), ("grass", (5,))]
    got = p2p.replacement_mapper(source, edit)
    ref = authors_replacement_mapper([[2]], [[2, 3]])
    assert torch.equal(got[:3], ref[:3])  # up to the swapped word: the authors' mapper
    assert got[2, 2] == got[2, 3] == 0.5
    # later tokens: source i -> edit i+1 (the authors' loop writes j -> j there)
    assert got[3, 4] == 1 and got[4, 5] == 1 and got[3, 3] == 0


def test_word_swap_needs_as_many_words():
    with pytest.raises(ValueError, match="same number of words"):
        p2p.replacement_mapper([("a", (1,)), ("cat", (2,))], [("a", (1,)), ("fluffy", (2,)), ("cat", (3,))])


# --- the attention ----------------------------------------------------------------------------------------------


def edits_for(kind, equalizer=None, windows=None):
    eq = torch.ones(K) if equalizer is None else equalizer
    cross = windows or [(None, (0.0, 0.8))]
    if kind == "replace":
        g = torch.Generator().manual_seed(5)
        mapper = torch.eye(K)
        mapper[2] = 0
        mapper[2, 2], mapper[2, 3] = 0.5, 0.5  # a fan-out, as for a word of two tokens
        return [p2p.PromptEdit(mapper, torch.zeros(K), eq, cross)], (mapper,)
    mapper, alphas = p2p.refinement_mapper(SOURCE, REFINED)
    return [p2p.refine_edit(SOURCE, REFINED, K, equalizer=eq, cross_windows=cross)], (mapper, alphas)


@pytest.mark.parametrize("cond_or_uncond", [[1, 0], [0, 1], [0], [1], [0, 0]])
@pytest.mark.parametrize("kind", ["replace", "refine", "reweight", "refine+reweight"])
@pytest.mark.parametrize("step", [0, 7, 9])
def test_cross_attention_is_the_authors(cond_or_uncond, kind, step):
    groups = 2  # two input images, each [source, edit]
    batch = len(cond_or_uncond) * 2 * groups
    q, k, v = random_qkv(batch, 16, K, seed=step)
    total = 10
    eq = torch.ones(K)
    if "reweight" in kind:
        eq[2], eq[5] = 2.5, -1.0  # 2: an added word of the refinement
    edits, mapping = edits_for("refine" if "refine" in kind else "replace", eq)
    technique = p2p.PromptToPrompt(edits)
    call = make_call(batch, cond_or_uncond, False, 4, step=step, total=total)
    out = technique(q, k, v, call, attend)

    # the authors' alpha_time_words for a 0.8 window over total+1 entries
    alpha_words = torch.zeros(total + 1)
    alpha_words[: int(0.8 * (total + 1))] = 1
    a = alpha_words[step]
    p = probs(q, k)
    expected = apply_probs(p, v)
    images = 2 * groups
    for chunk, c in enumerate(cond_or_uncond):
        if c != 0:
            continue  # the authors edit the conditional half only
        for group in range(groups):
            rows = [chunk * images + group * 2, chunk * images + group * 2 + 1]
            attn = p[rows].reshape(2 * HEADS, 16, K).clone()
            if "refine" in kind:
                def replace(base, rep):  # AttentionReweight with AttentionRefine as its previous controller
                    refined = authors_refine(base, rep, mapping[0][None], mapping[1][None])
                    return refined * eq.double()[None, None, None, :] if "reweight" in kind else refined
            else:
                mapper = mapping[0][None].double()

                def replace(base, rep):
                    base = authors_replace(base, rep, mapper)[0]  # the reweight's previous controller
                    return (base[None] * eq.double()[None, None, None, :]) if kind == "reweight" else base[None]
            edited = authors_edit_forward(attn, 2, True, replace, a, False).reshape(2, HEADS, 16, K)
            expected[rows] = apply_probs(edited, v[rows])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cond_or_uncond", [[1, 0], [0]])
@pytest.mark.parametrize("side, step, replaced", [(4, 2, True), (4, 4, False), (8, 0, False), (2, 0, True)])
def test_self_attention_injection_is_the_authors(cond_or_uncond, side, step, replaced):
    """The source's self-attention maps in layers ≥ 4x downsampled (4², 2² of a 16² latent), first 40% of steps."""
    batch = len(cond_or_uncond) * 3
    q, k, v = random_qkv(batch, side * side, side * side, seed=side + step)
    technique = p2p.PromptToPrompt(edits_for("replace")[0] * 2)
    call = make_call(batch, cond_or_uncond, True, side, step=step, total=10)
    assert technique.wants(call) == (replaced and 0 in cond_or_uncond)
    out = technique(q, k, v, call, attend) if technique.wants(call) else attend(q, k, v)
    p = probs(q, k)
    expected = apply_probs(p, v)
    if replaced:
        chunk = cond_or_uncond.index(0)
        rows = list(range(chunk * 3, chunk * 3 + 3))
        attn = authors_edit_forward(p[rows].reshape(3 * HEADS, side * side, -1).clone(), 3, False, None, None, True)
        expected[rows] = apply_probs(attn.reshape(3, HEADS, side * side, -1), v[rows])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_per_word_windows_and_no_replacement_after_the_window():
    eq = torch.ones(K)
    windows = [(None, (0.0, 0.8)), ((3,), (0.0, 0.2))]
    edit = p2p.PromptEdit(torch.eye(K), torch.zeros(K), eq, windows)
    assert edit.time_alpha(0, 10)[3] == 1 and edit.time_alpha(3, 10)[3] == 0 and edit.time_alpha(3, 10)[4] == 1
    assert not edit.time_alpha(9, 10).any()
    technique = p2p.PromptToPrompt([edit])
    q, k, v = random_qkv(2, 16, K)
    call = make_call(2, [0], False, 4, step=9, total=10)
    torch.testing.assert_close(technique(q, k, v, call, attend), attend(q, k, v))


def test_identity_edit_reproduces_the_source():
    technique = p2p.PromptToPrompt([p2p.PromptEdit(torch.eye(K), torch.zeros(K), torch.ones(K))])
    q, k, v = random_qkv(1, 16, K)
    q, k, v = (t.repeat(2, 1, 1) for t in (q, k, v))
    for is_self, keys in ((False, (k, v)), (True, (q, q))):
        kk, vv = keys
        out = technique(q, kk, vv, make_call(2, [0], is_self, 4, step=1), attend)
        assert (out[1] - out[0]).abs().max() <= 1e-6


# --- local blend ------------------------------------------------------------------------------------------------


def test_local_blend_is_the_authors():
    g = torch.Generator().manual_seed(3)
    words = torch.zeros(2, K)
    words[0, 2], words[1, 5], words[1, 6] = 1, 1, 1
    threshold = 0.7  # high enough that the source's and the edit's masks differ on random maps
    technique = p2p.PromptToPrompt(edits_for("replace")[0], blend_words=words, blend_threshold=threshold)
    technique.begin()
    side, layers, steps = 8, 2, 3
    stored = []  # the authors' attention_store: per layer, summed over steps
    total_store = [torch.zeros(2 * HEADS, side * side, K, dtype=torch.float64) for _ in range(layers)]
    for step in range(steps):
        for layer in range(layers):
            q, k, v = random_qkv(4, side * side, K, seed=100 + step * 10 + layer)
            call = make_call(4, [0, 1], False, side, step=step, layer=("output", 3 + layer, 0))
            technique(q, k, v, call, attend)
            total_store[layer] += probs(q, k)[:2].reshape(2 * HEADS, side * side, K)
    x_t = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    maps = torch.cat([m.reshape(2, HEADS, 1, side, side, K) for m in total_store], dim=1)
    alpha_layers = words.double().reshape(2, 1, 1, 1, 1, K)
    expected = authors_local_blend(x_t, maps, alpha_layers, threshold)
    got = technique.blend(x_t)
    own = technique.blend_mask((16, 16))
    assert own[1].sum() > own[0].sum() > 0  # the edit's mask is the union with the source's
    torch.testing.assert_close(got, expected)
    assert technique.blend_grid == (side, side)


def test_local_blend_picks_the_grid_nearest_16_squared():
    words = torch.zeros(2, K)
    words[:, 2] = 1
    technique = p2p.PromptToPrompt(edits_for("replace")[0], blend_words=words)
    for side in (4, 8, 32):
        q, k, v = random_qkv(2, side * side, K, seed=side)
        technique(q, k, v, make_call(2, [0], False, side, latent=32), attend)
    technique.blend(torch.zeros(2, 4, 32, 32))
    assert technique.blend_grid == (8, 8)  # 8² is nearer 16² than 32² in log scale; 4² is farther
    assert set(technique.grid_maps) == {(8, 8)}


def test_no_blend_words_leaves_the_latent_alone():
    technique = p2p.PromptToPrompt(edits_for("replace")[0])
    x = torch.randn(2, 4, 8, 8)
    assert technique.blend(x) is x
