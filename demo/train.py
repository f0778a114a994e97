"""Train the pack's demo model on the demo world, reproducibly, with one command.

    python demo/train.py                      # from random weights (CPU, 2 cores: 110 minutes on a Xeon);
                                              # writes demo/weights/, replacing the committed weights (--out)
    python demo/train.py --device cuda        # the same run on a GPU
    python demo/train.py --smoke --out /tmp/demo_smoke.safetensors   # end to end in a minute or two
    python demo/train.py --resume demo/weights/demo_model.safetensors --unet-iters 1300
                                              # train on from a file this script wrote (see --resume)

Three models, built from ComfyUI's own classes through nodes/demo.py so
the trained weights load into exactly the modules that sample them:
1. the VAE (TAESD architecture) as an autoencoder on random crops of scenes;
   then the latents the UNet sees (after SD1.5's latent factor 0.18215) are
   made zero-mean and unit-variance per channel (`normalise_latents`), and
   the decoder alone trains on to absorb that change;
2. the text encoder (ComfyUI's CLIP text model behind the standard CLIP
   tokenizer) and the UNet (SD1.5 architecture) jointly on the ε-prediction
   loss in ComfyUI's own noise schedule, on latents of a fixed set of scenes,
   each timestep's loss weighted by 1 + σ², capped (see `diffusion_loss_weights`),
   and each latent cell an object touches weighted up (see `object_loss_weights`);
   captions drop their background clause (so "a red circle" alone is in
   distribution) or are emptied (for classifier-free guidance) at fixed rates;
3. evaluation: VAE reconstruction PSNR on held-out scenes, through
   comfy.sd.VAE; single-object prompt fidelity, sampling with ComfyUI's
   KSampler path and checking the largest detected object.
The weights (EMA for UNet and text encoder) go to one safetensors file, float16,
keys prefixed `unet.`, `clip.`, `vae.`; its metadata records the command,
seed, configs and metrics, and a JSON file beside it repeats them.

With --resume, all three start from a file this script wrote: the VAE's
encoder is not trained again (a file written before the per-channel fold is
normalised now; one that records its fold keeps it, since re-measuring on 64
other scenes would move channel means by up to a third of their spread under a
trained UNet), its decoder trains on for --vae-adapt-iters, then the
UNet and text encoder train on; the file's provenance (hash, command, seed,
metrics and its own provenance) goes into the new metadata under "resumed_from".

Training scenes use world seeds below 2**32; held-out scenes use 2**32 and up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "demo" / "weights" / "demo_model.safetensors"
HELD_OUT_SEED = 2**32  # world seeds from here on are never trained on
SD15_LATENT_FACTOR = 0.18215  # comfy.latent_formats.SD15.scale_factor


@dataclass(frozen=True)
class Budget:
    size: int = 128  # scene resolution (latents are size / 8)
    vae_iters: int = 4500
    vae_batch: int = 8
    vae_crop: int = 64  # the VAE is convolutional: crops train it at a quarter of the cost
    vae_lr: float = 3e-4
    vae_bf16: bool = True  # bfloat16 autocast for the VAE's convolutions where the device has it (1.8x on AVX512-BF16)
    vae_adapt_iters: int = 2500  # the decoder alone, after normalise_latents changed its input
    scenes: int = 5000  # fixed training set for the UNet, encoded once
    single_object_share: float = 0.7  # of the UNet's scenes; the world draws 40% (N_OBJECTS_WEIGHTS), more oversamples
    # (object_loss_weight 4 with share 0.7 took one run from 70% to 91% single-object fidelity: README)
    unet_iters: int = 10000
    unet_batch: int = 32
    unet_lr: float = 1.5e-3  # benchmarks/unet_lr_sweep.py, 400 iterations: 5e-4 .097, 1e-3 .084, 2e-3 .075, 3e-3 diverged
    warmup: int = 200
    ema: float = 0.999
    loss_weight_cap: float = 5.0  # see diffusion_loss_weights
    object_loss_weight: float = 4.0  # latent cells an object touches weigh 1 + this in the ε-loss (see object_loss_weights)
    p_no_background: float = 0.2  # captions without their background clause
    p_empty: float = 0.1  # empty captions, for classifier-free guidance
    eval_scenes: int = 64  # held-out scenes for VAE PSNR
    eval_prompts: int = 140  # single-object prompts (each colour-shape pair four times)
    sample_steps: int = 20
    cfg: float = 5.0


SMOKE = Budget(vae_iters=3, vae_adapt_iters=2, vae_batch=2, scenes=8, unet_iters=3, unet_batch=4, warmup=1, ema=0.5,
               eval_scenes=2, eval_prompts=2, sample_steps=2)


def load_host(device: str):
    """ComfyUI in this process with the pack loaded, through the pack's one loader (examples/headless.py),
    on the CPU for `--device cpu`; returns (the host, how it was found)."""
    sys.path.insert(0, str(REPO / "examples"))
    import headless

    root, how = headless.find_comfyui()
    if root is None:
        raise SystemExit(how)
    return headless.load_host(cpu=device == "cpu"), how


def world_seed(seed: int, *stream: int) -> int:
    """A training scene's world seed: a hash of the run seed and its position, below 2**32."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def render_batch(world, seeds, size: int, single=None):
    """Rendered scenes of these world seeds; where `single` is true, the seed's scene has one object."""
    import torch

    single = [False] * len(seeds) if single is None else single
    scenes = [world.render(world.random_scene(s, n_objects=1 if one else None), size) for s, one in zip(seeds, single)]
    images = torch.from_numpy(np.stack([r.image for r in scenes])).permute(0, 3, 1, 2).float() / 255
    return images, scenes


def lr_at(step: int, budget_iters: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, budget_iters - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Progress:
    def __init__(self, stage: str, total: int, every: int):
        self.stage, self.total, self.every = stage, total, max(1, every)
        self.start = time.perf_counter()
        self.losses = []

    def log(self, step: int, loss: float):
        self.losses.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.start
            per_iter = elapsed / (step + 1)
            recent = float(np.mean(self.losses[-self.every:]))
            print(f"[{self.stage}] {step + 1}/{self.total} loss {recent:.5f}  {per_iter:.3f} s/it  "
                  f"eta {per_iter * (self.total - step - 1) / 60:.1f} min", flush=True)

    @property
    def seconds_per_iter(self) -> float | None:
        # None for a stage that ran no iterations (--unet-iters 0): its set-up time is no per-iteration figure
        return (time.perf_counter() - self.start) / len(self.losses) if self.losses else None


def bf16_supported(device) -> bool:
    """Whether bfloat16 autocast is fast here: native on CUDA, and on CPUs with AVX512-BF16 or AMX
    (elsewhere oneDNN emulates it, slower than float32)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def train_vae(world, demo, budget: Budget, seed: int, device, taesd=None, bf16: bool = False):
    """TAESD as an autoencoder on [0, 1] images, MSE loss, on random crops (under bfloat16
    autocast with `bf16`; weights and loss stay float32).

    Given a trained `taesd`, only its decoder trains: the encoder defines the
    latent space a trained UNet works in, and must not move under it."""
    import comfy.taesd.taesd
    import torch

    decoder_only = taesd is not None
    if taesd is None:
        taesd = comfy.taesd.taesd.TAESD()
        demo.seeded_init(taesd, seed)
    taesd.to(device).train()
    taesd.taesd_decoder.requires_grad_(True)
    taesd.taesd_encoder.requires_grad_(not decoder_only)
    coders = list(taesd.taesd_decoder.parameters())
    if not decoder_only:
        coders += list(taesd.taesd_encoder.parameters())
    optimizer = torch.optim.Adam(coders, lr=budget.vae_lr)
    iters = budget.vae_adapt_iters if decoder_only else budget.vae_iters
    stream = 4 if decoder_only else 1  # the decoder's own scenes and crops
    crop_rng = np.random.default_rng([seed, stream])
    progress = Progress("vae decoder" if decoder_only else "vae", iters, iters // 40)
    for step in range(iters):
        images, _ = render_batch(world, [world_seed(seed, stream, step, i) for i in range(budget.vae_batch)], budget.size)
        y, x = crop_rng.integers(0, budget.size - budget.vae_crop + 1, size=2)
        images = images[:, :, y:y + budget.vae_crop, x:x + budget.vae_crop].to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, iters, budget.warmup, budget.vae_lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.set_grad_enabled(not decoder_only):
                latents = taesd.taesd_encoder(images)
            decoded = taesd.taesd_decoder(latents)
        loss = torch.nn.functional.mse_loss(decoded.float(), images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(coders, 1.0)  # no normalisation layers: keep early steps bounded
        optimizer.step()
        progress.log(step, loss.item())
    taesd.eval().requires_grad_(False)
    return taesd, progress.seconds_per_iter


def normalise_latents(taesd, images) -> dict:
    """Make the encoder's latents zero-mean and unit-variance per channel, with vae_scale and
    vae_shift set so the UNet sees them unchanged (SD1.5's latent factor cancelled).

    SD's noise schedule assumes every latent channel spreads about as far as unit noise. One
    normalisation over all channels left each channel at std 0.2-0.4 around means up to ±1.3: at
    a sampler's first step (σ 14.6) ε̂ then had to be ten times more precise than the UNet learned
    it, and generated latents came out with 2-3× the data's spread per channel, decoding to noise.
    TAESD's scale and shift are scalars, so the per-channel affine map is folded into the encoder's
    last convolution and, inverted, into the decoder's first. That is exact but for the decoder's
    soft clamp and zero padding in front of it, which the decoder training after this absorbs.
    Returns the per-channel statistics it removed."""
    import torch

    with torch.no_grad():
        raw = torch.cat([taesd.taesd_encoder(chunk) for chunk in images.split(16)])
        mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3))
        last, first = taesd.taesd_encoder[-1], taesd.taesd_decoder[1]  # decoder[0] is its clamp
        last.weight.div_(std.view(-1, 1, 1, 1))
        last.bias.sub_(mean).div_(std)
        first.bias.add_((first.weight * mean.view(1, -1, 1, 1)).sum((1, 2, 3)))
        first.weight.mul_(std.view(1, -1, 1, 1))
        taesd.vae_scale.fill_(SD15_LATENT_FACTOR)
        taesd.vae_shift.fill_(0.0)
    return {"mean": [round(v, 4) for v in mean.tolist()], "std": [round(v, 4) for v in std.tolist()]}


def fold_scenes(world, budget: Budget, seed: int):
    """The images normalise_latents measures: the UNet's first 64 training scenes."""
    return render_batch(world, [world_seed(seed, 2, i) for i in range(64)], budget.size)[0]


def encode_scenes(world, taesd, model, budget: Budget, seed: int, device):
    """The UNet's training set: latents as the sampler sees them, the scenes, and which latent
    cells each scene's objects touch (`object_cells`)."""
    import torch

    seeds = [world_seed(seed, 2, i) for i in range(budget.scenes)]
    single = forced_single_objects(world, budget, seed)
    latents, scenes, cells = [], [], []
    with torch.no_grad():
        for start in range(0, len(seeds), 64):
            images, rendered = render_batch(world, seeds[start:start + 64], budget.size, single[start:start + 64])
            # TAESD.encode takes [-1, 1] images, as comfy.sd.VAE hands them over
            latents.append(model.latent_format.process_in(taesd.encode(images.to(device) * 2 - 1)).cpu())
            scenes += [r.scene for r in rendered]
            cells.append(object_cells(rendered, latents[-1].shape[-1]))
    return torch.cat(latents), scenes, torch.cat(cells)


def object_cells(rendered, latent_side: int):
    """[N, 1, latent_side, latent_side] bool: the latent cells any visible pixel of an object falls in."""
    import torch

    masks = torch.from_numpy(np.stack([r.masks.any(0) for r in rendered]))[:, None].float()
    return torch.nn.functional.adaptive_max_pool2d(masks, latent_side).bool()


def forced_single_objects(world, budget: Budget, seed: int) -> list[bool]:
    """Which training scenes are drawn with one object, so that one-object scenes make up
    `single_object_share` of the set: the world draws a share w of them itself, so a further
    (share - w) / (1 - w) of the scenes are forced to one object. At the world's own share
    none are, and the set is the world's draw unchanged."""
    natural = world.N_OBJECTS_WEIGHTS[0]
    forced = max(0.0, (budget.single_object_share - natural) / (1 - natural))
    return (np.random.default_rng([seed, 4]).random(budget.scenes) < forced).tolist()


def training_caption(world, scene, rng: np.random.Generator, budget: Budget) -> str:
    draw = rng.random()
    if draw < budget.p_empty:
        return ""
    return world.caption(scene, with_background=draw >= budget.p_empty + budget.p_no_background)


def token_ids(clip, text: str) -> list[int]:
    return [token for token, _weight in clip.tokenize(text)["l"][0]]


def diffusion_loss_weights(sigmas, cap: float):
    """Per-timestep weights of the ε-loss: 1 + σ², capped at `cap`, normalised to mean 1 over the schedule.

    A sampler's first steps turn ε̂ into x̂0 = (x - σ ε̂), so an ε error there is
    multiplied by σ (14.6 at SD's first step); ε-loss × (1 + σ²) is the v-prediction
    loss, which weighs each step by what its error costs x̂0 (EDM's weighting too,
    in ε terms). But SD's schedule draws t uniformly, and half its timesteps have
    σ > 1.6: uncapped, those carried 96% of the loss, and the mid and low noise
    levels where a shape's outline is drawn learned almost nothing (the model
    drew the prompted colours as blobs). EDM reaches the same balance by drawing
    σ mostly below 2; the cap does it on SD's uniform t (cap 5: σ < 1.6 gets a
    quarter of the weight)."""
    weights = (1 + sigmas**2).clamp(max=cap)
    return weights / weights.mean()


def object_loss_weights(cells, weight: float):
    """Per-cell weights of the ε-loss: 1 + `weight` where an object is, 1 elsewhere, normalised to
    mean 1 over the batch (so the loss keeps its scale and the learning rate its meaning).

    Objects cover about 12% of a scene; the rest is background, whose dots, checks and
    texture are most of the ε-error and most of the gradient. But a prompt is right or wrong
    on the object's cells (its colour and its outline), so uniform weights spend most of a
    short CPU budget on background patterns. Weight 4 puts about half the loss on the
    cells the objects touch, and the background still trains on the other half."""
    weights = 1 + weight * cells.float()
    return weights / weights.mean()


def train_diffusion(world, clip, unet_patcher, latents, scenes, cells, budget: Budget, seed: int, device,
                    fresh: bool = True):
    """ε-prediction on ComfyUI's discrete schedule; text encoder and UNet trained jointly; `cells`
    (from encode_scenes) weigh the loss toward the objects (object_loss_weights)."""
    import torch

    model = unet_patcher.model
    unet = model.diffusion_model.to(device).train()
    text = clip.cond_stage_model.to(device).train()
    clip.cond_stage_model.reset_clip_options()
    if fresh:
        with torch.no_grad():
            unet.out[-1].weight.zero_()  # start from "predict zero noise": a stable first step
            unet.out[-1].bias.zero_()
    params = list(unet.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=budget.unet_lr, weight_decay=0.0)
    sigmas = model.model_sampling.sigmas.to(device)
    loss_weights = diffusion_loss_weights(sigmas, budget.loss_weight_cap)
    rng = np.random.default_rng([seed, 3])
    generator = torch.Generator().manual_seed(seed)
    progress = Progress("unet", budget.unet_iters, budget.unet_iters // 60)
    for step in range(budget.unet_iters):
        index = rng.integers(0, len(scenes), size=budget.unet_batch)
        captions = [training_caption(world, scenes[i], rng, budget) for i in index]
        batch = torch.from_numpy(index)
        x0 = latents[batch].to(device)
        cell_weights = object_loss_weights(cells[batch].to(device), budget.object_loss_weight)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, len(sigmas), (budget.unet_batch,), generator=generator).to(device)
        sigma = sigmas[t].view(-1, 1, 1, 1)
        # ComfyUI's EPS model input: (x0 + σε) / √(1 + σ²) = √ᾱ x0 + √(1-ᾱ) ε
        x_in = (x0 + sigma * noise) / torch.sqrt(sigma**2 + 1)
        context = text.clip_l.encode([token_ids(clip, c) for c in captions])[0]
        predicted = unet(x_in, timesteps=t.float(), context=context)
        loss = (loss_weights[t].view(-1, 1, 1, 1) * cell_weights * (predicted - noise) ** 2).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, budget.unet_iters, budget.warmup, budget.unet_lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - budget.ema)
        progress.log(step, loss.item())
    with torch.no_grad():
        for p, average in zip(params, ema):
            p.copy_(average)
    unet.eval().cpu()
    text.eval().cpu()
    return progress.seconds_per_iter


def vae_psnr(world, vae, budget: Budget) -> float:
    """Mean PSNR (dB) of held-out scenes through comfy.sd.VAE encode/decode."""
    import torch

    scores = []
    for i in range(budget.eval_scenes):
        image = world.render(world.random_scene(HELD_OUT_SEED + i), budget.size).image
        pixels = torch.from_numpy(image).float()[None] / 255
        decoded = vae.decode(vae.encode(pixels)).float().cpu()
        mse = torch.mean((decoded.reshape(pixels.shape) - pixels) ** 2).item()
        scores.append(10 * math.log10(1 / max(mse, 1e-10)))
    return float(np.mean(scores))


def single_object_fidelity(world, detect, clip, unet_patcher, vae, budget: Budget, seed: int) -> dict:
    """Share of single-object prompts whose largest detected object has the prompted
    colour and shape (each colour-shape pair in turn, on held-out backgrounds)."""
    import comfy.sample
    import torch

    pairs = [(c, s) for c in world.COLORS for s in world.SHAPES]

    def encode(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    negative = encode("")
    latent_side = budget.size // 8
    hits = {"color": 0, "shape": 0, "both": 0}
    for i in range(budget.eval_prompts):
        color, shape = pairs[i % len(pairs)]
        scene = world.random_scene(HELD_OUT_SEED + 10_000 + i, objects=[(color, shape)])
        noise = torch.randn(1, 4, latent_side, latent_side, generator=torch.Generator().manual_seed(seed + i))
        latent = comfy.sample.sample(unet_patcher, noise, budget.sample_steps, budget.cfg, "euler", "normal",
                                     encode(scene.caption), negative, torch.zeros_like(noise), seed=seed + i,
                                     disable_pbar=True)
        image = vae.decode(latent)[0].cpu().numpy()
        found = detect.detect_objects(image)
        largest = found[0] if found else None
        hits["color"] += bool(largest and largest.color == color)
        hits["shape"] += bool(largest and largest.shape == shape)
        hits["both"] += bool(largest and largest.color == color and largest.shape == shape)
    return {key: value / budget.eval_prompts for key, value in hits.items()}


TOKEN_EMBEDDING = "clip.clip_l.transformer.text_model.embeddings.token_embedding.weight"
TOKEN_IDS = "clip.token_ids"  # the rows of TOKEN_EMBEDDING that are stored; all others are zero


def vocabulary_token_ids(clip, world) -> list[int]:
    """Every token a caption of the world can produce (words, commas, start/end/padding)."""
    return sorted(set(token_ids(clip, " ".join(world.vocabulary()) + " ,")))


def save(path: Path, taesd, clip, unet_patcher, token_rows: list[int], metadata: dict) -> int:
    """float16 safetensors with prefixed keys; returns the file size in bytes.

    Only the token-embedding rows of the world's vocabulary are stored (49408 x 64
    would take a quarter of the 25 MB budget): the others never received a
    gradient, and a loader sets them to zero."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    parts = {"unet.": unet_patcher.model.diffusion_model, "clip.": clip.cond_stage_model, "vae.": taesd}
    for prefix, module in parts.items():
        for key, value in module.state_dict().items():
            value = value.detach().cpu()
            tensors[prefix + key] = (value.half() if value.is_floating_point() else value).contiguous()
    rows = torch.tensor(token_rows, dtype=torch.int64)
    tensors[TOKEN_EMBEDDING] = tensors[TOKEN_EMBEDDING][rows].contiguous()
    tensors[TOKEN_IDS] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=1) + "\n")
    return path.stat().st_size


def provenance(path: Path) -> dict:
    """What a resumed run started from: the file's hash, and the command, seed, metrics and
    own provenance its metadata records (so the chain back to random weights is kept)."""
    from safetensors import safe_open

    if not path.is_file():
        raise SystemExit(f"--resume: no such file {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "command" not in metadata:
        raise SystemExit(f"--resume: {path} was not written by demo/train.py (its metadata has no command)")
    record = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    for key in ("command", "seed", "git_commit", "metrics", "resumed_from", "latent_statistics_folded"):
        if key in metadata:
            record[key] = metadata[key] if key in ("command", "seed", "git_commit") else json.loads(metadata[key])
    return record


def git_commit() -> str:
    """HEAD, with "+dirty" when tracked files differ from it: read when the run starts, since
    the code that trains is the code loaded then, whatever is committed while it runs."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, scenes, noise and caption dropout")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny iteration counts: checks the pipeline end to end")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the safetensors file to write")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch")
    parser.add_argument("--resume", type=Path, default=None,
                        help="a file this script wrote: train on from it (the VAE's decoder only, then the UNet "
                             "and text encoder) instead of from random weights; --vae-iters is then unused")
    for name, default in asdict(Budget()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=flag if isinstance(default, bool) else type(default),
                            default=None,
                            help=f"override the budget's {name} (full run: {default})")
    args = parser.parse_args(argv)
    budget = SMOKE if args.smoke else Budget()
    budget = replace(budget, **{k: v for k, v in vars(args).items() if k in asdict(budget) and v is not None})
    if budget.size % 8 or not 64 <= budget.size <= 256:
        raise SystemExit(f"--size must be a multiple of 8 between 64 and 256, got {budget.size}")
    if budget.object_loss_weight < 0:
        raise SystemExit(f"--object-loss-weight must be 0 (the plain loss) or more, got {budget.object_loss_weight}")
    command = "python demo/train.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    started, commit = time.perf_counter(), git_commit()
    host, how = load_host(args.device)
    import comfy.sd
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    world = host.module("demo.world")
    if not world.N_OBJECTS_WEIGHTS[0] <= budget.single_object_share <= 1:
        raise SystemExit(f"--single-object-share must be between the world's own share "
                         f"{world.N_OBJECTS_WEIGHTS[0]} and 1, got {budget.single_object_share}")
    detect = host.module("demo.detect")
    demo = host.module("nodes.demo")
    print(f"ComfyUI host: {how}; device {args.device}, {args.threads} threads; budget {asdict(budget)}", flush=True)
    vae_bf16 = budget.vae_bf16 and bf16_supported(device)

    if args.resume is None:
        resumed_from, unet_patcher, clip = None, demo.random_unet(seed=args.seed + 1), None
        taesd, vae_s_per_it = train_vae(world, demo, budget, args.seed, device, bf16=vae_bf16)
    else:
        resumed_from, vae_s_per_it = provenance(args.resume), None
        unet_patcher, clip, trained_vae = demo.load_demo_model(args.resume)
        taesd = trained_vae.first_stage_model.float()
    if resumed_from is not None and "latent_statistics_folded" in resumed_from:
        latent_statistics = resumed_from["latent_statistics_folded"]
        print(f"[vae] the resumed VAE's latents are already normalised per channel (folded: {latent_statistics})",
              flush=True)
    else:
        latent_statistics = normalise_latents(taesd.to(device), fold_scenes(world, budget, args.seed).to(device))
        print(f"[vae] per-channel latent statistics folded into the VAE: {latent_statistics}", flush=True)
    taesd, decoder_s_per_it = train_vae(world, demo, budget, args.seed, device, taesd=taesd, bf16=vae_bf16)
    latents, scenes, cells = encode_scenes(world, taesd, unet_patcher.model, budget, args.seed, device)
    print(f"[data] {len(scenes)} scenes encoded: latent mean {latents.mean():.3f} std {latents.std():.3f}", flush=True)
    taesd.cpu()
    clip = clip or demo.text_encoder(seed=args.seed + 2)
    unet_s_per_it = train_diffusion(world, clip, unet_patcher, latents, scenes, cells, budget, args.seed, device,
                                    fresh=args.resume is None)

    vae = comfy.sd.VAE(sd=taesd.state_dict())
    with torch.no_grad():
        metrics = {
            "vae_psnr_db": round(vae_psnr(world, vae, budget), 2),
            "single_object": single_object_fidelity(world, detect, clip, unet_patcher, vae, budget, args.seed),
        }
    per_iter = {"vae_per_iter": vae_s_per_it, "decoder_per_iter": decoder_s_per_it, "unet_per_iter": unet_s_per_it}
    metrics["seconds"] = {**{stage: None if s is None else round(s, 3) for stage, s in per_iter.items()},
                          "total": round(time.perf_counter() - started, 1)}
    metadata = {
        "command": command, "seed": str(args.seed), "device": args.device, "budget": asdict(budget),
        "latent_statistics_folded": latent_statistics,
        "vae_autocast": "bfloat16" if vae_bf16 else "float32",
        "unet_config": demo.UNET_CONFIG, "text_config": demo.TEXT_CONFIG, "metrics": metrics,
        "git_commit": commit, "torch": torch.__version__, "vocabulary": world.vocabulary(),
    }
    if resumed_from is not None:
        metadata["resumed_from"] = resumed_from
    size = save(args.out, taesd, clip, unet_patcher, vocabulary_token_ids(clip, world), metadata)
    print(f"saved {args.out} ({size / 2**20:.1f} MiB) and {args.out.with_suffix('.json').name}")
    print("metrics: " + json.dumps(metrics))
    return metadata


if __name__ == "__main__":
    main()
