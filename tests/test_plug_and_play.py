"""Plug-and-Play core (plain torch) against the authors' pnp.py (MichalGeyer/plug-and-play), transcribed below."""

import pytest
import torch

from attention_lab.attention_patches import plug_and_play as pnp
from attention_lab.attention_patches import sdpa_attention
from attention_lab.attention_patches.call import AttentionCall, ChunkLayout

HEADS, DIM = 2, 4

# SD1.5's decoder: output blocks 0-2 at 1/8 of the latent's side, 3-5 at 1/4, 6-8 at 1/2, 9-11 at 1/1
SD15_LEVELS = [(b, 8 if b < 3 else 4 if b < 6 else 2 if b < 9 else 1) for b in range(12)]
SDXL_LEVELS = [(b, 4 if b < 3 else 2 if b < 6 else 1) for b in range(9)]


def authors_injection(q, k):
    """register_attention_control_efficient: batch [source, uncond, cond], each third of it."""
    n = q.shape[0] // 3
    q, k = q.clone(), k.clone()
    q[n:2 * n], k[n:2 * n] = q[:n], k[:n]
    q[2 * n:], k[2 * n:] = q[:n], k[:n]
    return q, k


def make_call(layout, step, total=50, layer=("output", 4, 0), is_self=True, side=4):
    return AttentionCall(layer=layer, ordinal=0, num_layers=1, is_self=is_self, height=side, width=side, heads=HEADS,
                         dim_head=DIM, step=step, total_steps=total, sigma=1.0, layout=layout, options={})


def test_layers_by_role():
    # the authors: up_blocks[1].resnets[1] = output block 4; attention res_dict {1: [1, 2], 2: [0..2], 3: [0..2]}
    assert pnp.decoder_roles(SD15_LEVELS) == (4, set(range(4, 12)))
    assert pnp.decoder_roles(SDXL_LEVELS) == (1, set(range(1, 9)))
    with pytest.raises(ValueError, match="no block 1 at 1/4"):
        pnp.decoder_roles([(0, 2), (1, 1)])


def test_windows_are_the_authors_timestep_prefixes():
    # scheduler.timesteps[:int(n·τ)]: 40 of 50 steps for τ_f = 0.8, 25 for τ_A = 0.5
    assert [pnp.active(0.8, s, 50) for s in range(50)].count(True) == 40
    assert pnp.active(0.5, 24, 50) and not pnp.active(0.5, 25, 50)
    assert not pnp.active(0.5, None, None) and not pnp.active(0.0, 0, 50)


def test_attention_matches_the_authors_injection():
    """Our layout [uncond: guidance, edit][cond: guidance, edit] with equal guidance rows gives the authors' output
    for their [guidance, uncond, cond] batch."""
    g = torch.Generator().manual_seed(0)
    guidance, uncond, cond = (torch.randn(1, 16, HEADS * DIM, generator=g) for _ in range(3))
    keys = [torch.randn(1, 16, HEADS * DIM, generator=g) for _ in range(3)]
    values = [torch.randn(1, 16, HEADS * DIM, generator=g) for _ in range(3)]
    q_a, k_a = authors_injection(torch.cat([guidance, uncond, cond]), torch.cat(keys))
    expected = sdpa_attention(q_a, k_a, torch.cat(values), HEADS)

    technique = pnp.PlugAndPlay([("output", 4, 0)], group=2)
    layout = ChunkLayout((1, 0), 2)
    q = torch.cat([guidance, uncond, guidance, cond])
    k = torch.cat([keys[0], keys[1], keys[0], keys[2]])
    v = torch.cat([values[0], values[1], values[0], values[2]])
    call = make_call(layout, step=3)
    assert technique.wants(call)
    out = technique(q, k, v, call, lambda q, k, v, mask=None: sdpa_attention(q, k, v, HEADS))
    torch.testing.assert_close(out[[1, 3]], expected[1:], rtol=0, atol=0)
    assert not technique.wants(make_call(layout, step=25))
    assert not technique.wants(make_call(layout, step=3, layer=("output", 3, 0)))
    assert not technique.wants(make_call(layout, step=3, is_self=False))


def test_features_only_while_armed_and_in_the_window():
    technique = pnp.PlugAndPlay([], group=3)
    h = torch.randn(6, 2, 3, 3)  # [uncond: guide, e1, e2][cond: guide, e1, e2]
    assert torch.equal(technique.inject_features(h), h)  # not armed: outside the feature block's UNet call
    schedule = torch.linspace(10, 0, 51)
    options = {"cond_or_uncond": [1, 0], "sigmas": schedule[39:40], "sample_sigmas": schedule}
    technique.arm(options)
    out = technique.inject_features(h)
    for row in range(6):
        assert torch.equal(out[row], h[row - row % 3])
    assert torch.equal(technique.inject_features(h), h)  # armed once per call
    technique.arm(dict(options, sigmas=schedule[40:41]))  # step 40 of 50: past τ_f = 0.8
    assert torch.equal(technique.inject_features(h), h)


def test_group_rows_refuses_a_batch_that_is_not_groups():
    with pytest.raises(ValueError, match="3 images per chunk do not split into groups of 2"):
        pnp.group_rows(ChunkLayout((0,), 3), 2)
    assert pnp.group_rows(ChunkLayout((0,), 4), 2) == ([1, 3], [0, 2])
