"""The UNet learning-rate comparison behind demo/train.py's default unet_lr.

    python benchmarks/unet_lr_sweep.py                  # 5e-4, 1e-3 and 2e-3, 400 iterations each (CPU, 2 cores: ~13 min)
    python benchmarks/unet_lr_sweep.py --lr 1.5e-3 --iters 1000
    python benchmarks/unet_lr_sweep.py --lr 2e-3 --iters 2000 --ema 0.999 --fidelity-prompts 70 --threads 1
                                                        # also sample: single-object fidelity, as train.py scores it

Each rate trains a fresh UNet and text encoder from the same random weights for the same
iterations, through train.py's own train_diffusion (its warm-up, cosine decay, loss weights
and caption dropout; EMA off, so the raw weights are scored). The latents are train.py's
scenes through the committed demo VAE's encoder, so only the rate differs. The score is on a
fixed held-out batch (the last --held-out scenes, never trained on, each twice, with fixed
noise, timesteps and full captions): train.py's weighted ε-loss, the figure compared; the
plain ε-loss; and the plain loss at timesteps below 400, where shapes are drawn.

Loss is a proxy; --fidelity-prompts also samples each trained model through ComfyUI's
KSampler path with the committed VAE and scores single-object fidelity exactly as train.py's
final evaluation does (train.single_object_fidelity, held-out backgrounds), so a rate can be
judged on the figure the demo model's target is set in. --threads lets two rates run side by
side as separate processes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3], help="peak learning rates to compare")
    parser.add_argument("--iters", type=int, default=400, help="UNet iterations per rate")
    parser.add_argument("--scenes", type=int, default=3000, help="scenes encoded, the held-out ones included")
    parser.add_argument("--held-out", type=int, default=100, help="the last scenes: scored, never trained on")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="EMA decay of the weights that are scored (train.py uses 0.999); 0 scores the raw weights")
    parser.add_argument("--fidelity-prompts", type=int, default=0,
                        help="also sample this many single-object prompts per rate and score colour and shape "
                             "as train.py does (0: loss only)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)")
    args = parser.parse_args(argv)
    if not 0 < args.held_out < args.scenes:
        raise SystemExit(f"--held-out must be between 1 and --scenes - 1 ({args.scenes - 1}), got {args.held_out}")
    if not 0 <= args.ema < 1:
        raise SystemExit(f"--ema must be in [0, 1), got {args.ema}")
    if args.fidelity_prompts < 0:
        raise SystemExit(f"--fidelity-prompts must be 0 or more, got {args.fidelity_prompts}")

    host = _common.load_host(cpu=True)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train = host.module("demo.train")
    world = host.module("demo.world")
    demo = host.module("nodes.demo")
    _, _, vae = demo.load_demo_model(train.DEFAULT_OUT)
    budget = replace(train.Budget(), scenes=args.scenes, unet_iters=args.iters, ema=args.ema,
                     eval_prompts=args.fidelity_prompts)
    started = time.perf_counter()
    latents, scenes, cells = train.encode_scenes(world, vae.first_stage_model.float(),
                                                 demo.random_unet(seed=1).model, budget, 0, "cpu")
    print(f"{args.scenes} scenes encoded in {time.perf_counter() - started:.0f} s", flush=True)

    trained = args.scenes - args.held_out
    generator = torch.Generator().manual_seed(123)
    index = torch.arange(trained, args.scenes).repeat(2)
    noise = torch.randn(len(index), 4, *latents.shape[2:], generator=generator)
    t = torch.randint(0, 1000, (len(index),), generator=generator)
    results = []
    for lr in args.lr:
        patcher, clip = demo.random_unet(seed=1), demo.text_encoder(seed=2)
        train.train_diffusion(world, clip, patcher, latents[:trained], scenes[:trained], cells[:trained],
                              replace(budget, unet_lr=lr), 0, "cpu")
        model = patcher.model
        sigmas = model.model_sampling.sigmas
        sigma = sigmas[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            captions = [world.caption(scenes[i]) for i in index.tolist()]
            context = clip.cond_stage_model.clip_l.encode([train.token_ids(clip, c) for c in captions])[0]
            x_in = (latents[index] + sigma * noise) / torch.sqrt(sigma**2 + 1)
            error = ((model.diffusion_model(x_in, timesteps=t.float(), context=context) - noise) ** 2).mean((1, 2, 3))
        weights = train.diffusion_loss_weights(sigmas, budget.loss_weight_cap)[t]
        row = {"lr": lr, "weighted": float((weights * error).mean()), "plain": float(error.mean()),
               "low_t": float(error[t < 400].mean())}
        print(f"lr {lr:g}: weighted ε-loss {row['weighted']:.4f}  plain {row['plain']:.4f}  "
              f"plain at t < 400 {row['low_t']:.4f}", flush=True)
        if args.fidelity_prompts:
            detect = host.module("demo.detect")
            with torch.no_grad():
                row["fidelity"] = train.single_object_fidelity(world, detect, clip, patcher, vae, budget, 0)
            print(f"lr {lr:g}: single-object fidelity over {args.fidelity_prompts} prompts: colour "
                  f"{row['fidelity']['color']:.0%}  shape {row['fidelity']['shape']:.0%}  "
                  f"both {row['fidelity']['both']:.0%}", flush=True)
        results.append(row)
    return results


if __name__ == "__main__":
    main()
