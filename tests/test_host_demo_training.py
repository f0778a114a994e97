"""demo/train.py: the latent normalisation, the loss weights, and a whole (smoke-sized) run
that writes a file DemoModelLoader reads, then a --resume run that records where it started."""

import argparse
import hashlib
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from attention_lab.demo import train

REPO = train.REPO


def test_normalise_latents_standardises_each_channel_and_keeps_the_decoding(host, tiny):
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD()
    tiny.seeded_init(taesd, 0)
    with torch.no_grad():
        # Channels of very different offsets and spreads, as a trained encoder gives them.
        taesd.taesd_encoder[-1].weight.mul_(torch.tensor([0.02, 0.05, 0.01, 0.03]).view(-1, 1, 1, 1))
        taesd.taesd_encoder[-1].bias.copy_(torch.tensor([-0.8, 0.5, -0.3, 0.7]))
        images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        raw = taesd.taesd_encoder(images)
        # What the decoder's first convolution makes of the latents (its soft clamp aside)
        first_layer = lambda latents: taesd.taesd_decoder[1]((latents - taesd.vae_shift) * taesd.vae_scale)  # noqa: E731
        before = first_layer(taesd.encode(images * 2 - 1))
        statistics = train.normalise_latents(taesd, images)
        latents = taesd.encode(images * 2 - 1) * train.SD15_LATENT_FACTOR  # as the UNet sees them
        after = first_layer(taesd.encode(images * 2 - 1))
    assert statistics["mean"] == pytest.approx(raw.mean((0, 2, 3)).tolist(), abs=1e-3)
    assert torch.allclose(latents.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(latents.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    # The fold is exact up to the decoder's soft clamp in front of that convolution (which the
    # decoder training after it absorbs) and the convolution's zero padding at the border.
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(after[inner], before[inner], atol=1e-5 * before.abs().max().item())
    assert not torch.allclose(after, before, atol=1e-5 * before.abs().max().item())  # the border differs


def test_loss_weights_are_one_plus_sigma_squared_capped_with_mean_one():
    sigmas = torch.tensor([0.03, 0.5, 1.0, 3.0, 14.6])
    weights = train.diffusion_loss_weights(sigmas, cap=5.0)
    assert weights.mean() == pytest.approx(1.0)
    expected = torch.tensor([1 + 0.03**2, 1.25, 2.0, 5.0, 5.0])
    assert torch.allclose(weights / weights[0], expected / expected[0])
    uncapped = train.diffusion_loss_weights(sigmas, cap=float("inf"))
    assert torch.allclose(uncapped / uncapped[0], (1 + sigmas**2) / (1 + sigmas[0] ** 2))


def test_a_stage_that_ran_no_iterations_has_no_per_iteration_time():
    progress = train.Progress("unet", total=0, every=1)
    assert progress.seconds_per_iter is None  # --unet-iters 0: set-up time is not a per-iteration figure
    progress.log(0, 0.5)
    assert progress.seconds_per_iter > 0


def _run(*args):
    done = subprocess.run([sys.executable, str(REPO / "demo" / "train.py"), "--smoke", "--threads", "1", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_a_smoke_run_writes_a_loadable_file_and_resume_records_its_origin(host, tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    out = _run("--out", str(first))
    assert "[vae decoder]" in out and "metrics:" in out
    meta = json.loads(first.with_suffix(".json").read_text())
    assert meta["command"] == f"python demo/train.py --smoke --threads 1 --out {first}"
    assert set(meta["latent_statistics_folded"]) == {"mean", "std"}
    model, clip, vae = host.module("nodes.demo").load_demo_model(first)
    assert vae.first_stage_model.vae_scale.item() == pytest.approx(train.SD15_LATENT_FACTOR, rel=1e-3)  # stored as float16

    _run("--seed", "1", "--resume", str(first), "--out", str(second), "--vae-bf16", "off")
    with safe_open(str(second), framework="pt") as handle:
        resumed_from = json.loads(handle.metadata()["resumed_from"])
    assert resumed_from["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert resumed_from["command"] == meta["command"] and resumed_from["seed"] == "0"
    assert "resumed_from" not in resumed_from  # the first file started from random weights
    # The first file's fold is kept: the encoder, which defines the UNet's latent space, is unchanged.
    with safe_open(str(first), framework="pt") as a, safe_open(str(second), framework="pt") as b:
        encoder = [k for k in a.keys() if k.startswith("vae.taesd_encoder.")]
        assert encoder and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in encoder)
    second_meta = json.loads(second.with_suffix(".json").read_text())
    assert second_meta["latent_statistics_folded"] == meta["latent_statistics_folded"]
    # bfloat16 autocast for the VAE by default where it is fast; a boolean budget flag turns it off
    expected = "bfloat16" if train.bf16_supported(torch.device("cpu")) else "float32"
    assert meta["vae_autocast"] == expected and meta["budget"]["vae_bf16"] is True
    assert second_meta["vae_autocast"] == "float32" and second_meta["budget"]["vae_bf16"] is False


def test_single_object_share_oversamples_one_object_scenes_and_the_worlds_own_share_leaves_the_set_alone():
    from attention_lab.demo import world

    natural = replace(train.Budget(), single_object_share=world.N_OBJECTS_WEIGHTS[0])
    assert not any(train.forced_single_objects(world, replace(natural, scenes=500), 0))
    budget = replace(natural, scenes=2000, single_object_share=0.7)
    forced = train.forced_single_objects(world, budget, 0)
    assert forced == train.forced_single_objects(world, budget, 0)  # seeded
    seeds = [train.world_seed(0, 2, i) for i in range(400)]
    _, rendered = train.render_batch(world, seeds, 64, forced[:400])
    counts = [len(r.scene.objects) for r in rendered]
    assert all(n == 1 for n, one in zip(counts, forced) if one)
    assert sum(n == 1 for n in counts) / len(counts) == pytest.approx(0.7, abs=0.06)
    # Scenes that are not forced are the world's own draw of that seed, as before the option.
    kept = next(i for i, one in enumerate(forced) if not one)
    assert rendered[kept].scene == world.random_scene(seeds[kept])


@pytest.mark.parametrize("flag, value, message", [
    ("--single-object-share", "0.2", "--single-object-share must be between the world's own share 0.4 and 1, got 0.2"),
    ("--object-loss-weight", "-1", "--object-loss-weight must be 0 (the plain loss) or more, got -1.0"),
])
def test_a_budget_value_out_of_range_is_refused_by_name(host, tmp_path, flag, value, message):
    result = subprocess.run([sys.executable, str(REPO / "demo" / "train.py"), "--smoke", flag, value,
                             "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_boolean_budget_flags_parse_words_not_python_truthiness():
    assert train.flag("off") is False and train.flag("False") is False and train.flag("1") is True
    with pytest.raises(argparse.ArgumentTypeError, match="expected true or false"):
        train.flag("maybe")


def test_resume_names_a_file_it_cannot_use(host, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "demo" / "train.py"), "--smoke", "--resume",
                           str(tmp_path / "missing.safetensors")], capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "--resume: no such file" in done.stderr


def test_git_commit_names_head_and_marks_uncommitted_changes(tmp_path, monkeypatch):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "train.py").write_text("print(1)\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    monkeypatch.setattr(train, "REPO", tmp_path)
    head = git("rev-parse", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked files do not train anything\n")
    assert train.git_commit() == head
    (tmp_path / "train.py").write_text("print(2)\n")
    assert train.git_commit() == head + "+dirty"
    monkeypatch.setattr(train, "REPO", tmp_path / "not-a-repo")
    assert train.git_commit() == "unknown"


def test_object_cells_mark_every_latent_cell_an_object_touches():
    from attention_lab.demo import world

    scene = world.Scene(objects=(world.SceneObject("square", "red", (0.25, 0.25, 0.5, 0.5)),),
                        background=world.Background("plain", "blue"))
    rendered = world.render(scene, 128)
    cells = train.object_cells([rendered], 16)
    assert cells.shape == (1, 1, 16, 16) and cells.dtype == torch.bool
    # the square covers pixels 32..63: latent cells 4..7, and no other
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:8, 4:8] = True
    assert torch.equal(cells[0, 0], expected)


def test_object_loss_weights_favour_object_cells_and_keep_mean_one():
    cells = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    cells[0, 0, :2, :2] = True  # 4 of 32 cells
    weights = train.object_loss_weights(cells, 4.0)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[cells].unique().numel() == 1 and weights[~cells].unique().numel() == 1
    assert (weights[cells][0] / weights[~cells][0]).item() == pytest.approx(5.0)
    assert torch.equal(train.object_loss_weights(cells, 0.0), torch.ones_like(weights))  # weight 0: the plain loss
