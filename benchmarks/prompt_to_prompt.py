"""Prompt-to-Prompt cost: one edit (the source and one edited prompt, batched) against one plain generation.

    python benchmarks/prompt_to_prompt.py            # GPU if there is one (full SDXL, fp16, 1024²), else CPU small
    python benchmarks/prompt_to_prompt.py --size 512 --steps 10

SDXL architecture (random weights: timing does not depend on the values), CFG 7.5,
euler, 50 steps on a GPU (the authors'), through ComfyUI's CFGGuider for the plain
generation and PromptToPromptEdit's guider for the edit, with the authors' defaults
and local blend on one word (so the blend maps are recorded too). Target on a GPU:
≤ 2.1x the plain generation (the edit is two images). CPU default: the narrow
SDXL-structured test UNet in fp32 at 256², 4 steps. Prints the device, the config
and one table.
"""

from __future__ import annotations

import statistics
import time

import _common

SOURCE = "a photo of a cat riding a bike"
EDIT = "a photo of a dog riding a bike"


def main():
    args = _common.sdxl_arguments(__doc__.split("\n")[0], steps=(50, 4), cfg=7.5)
    host = _common.load_host()
    import comfy.sample
    import comfy.samplers
    import torch

    tiny = _common.pack_module(host, "nodes.tiny_models")
    p2p = _common.pack_module(host, "nodes.prompt_to_prompt")
    patching = _common.pack_module(host, "nodes.patching")
    full = args.model == "full"
    model = _common.sdxl_model(tiny, _common.torch_dtype(args.dtype), full)
    clip = tiny.text_encoder(seed=1)  # its tokenizer aligns the two prompts; the conditioning is random
    positive, negative = _common.sdxl_conditioning(tiny, 2, full)
    cond, extra = positive[0]
    source_only = [[cond[:1], dict(extra, pooled_output=extra["pooled_output"][:1])]]
    negative = [[negative[0][0][:1], dict(negative[0][1], pooled_output=negative[0][1]["pooled_output"][:1])]]

    def plain_guider():
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(source_only, negative)
        guider.set_cfg(args.cfg)
        return guider

    def edit_guider():
        technique = p2p.build_technique(clip, SOURCE, [EDIT], blend_words="cat, dog")
        patched = model.clone()
        patching.attach_router(patched).add(technique)
        guider = p2p.PromptToPromptGuider(patched, technique)
        guider.set_conds(positive, negative)
        guider.set_cfg(args.cfg)
        return guider

    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    sampler = comfy.samplers.sampler_object("euler")

    def timed(make, steps):
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
        cuda = torch.cuda.is_available() and model.load_device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = make().sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=0)
        if cuda:
            torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else None

    _common.describe_sdxl_run(args, full)
    results = {}
    for label, make in (("plain generation", plain_guider), ("Prompt-to-Prompt edit", edit_guider)):
        timed(make, min(args.steps, 2))  # warm-up: load, kernels
        runs = [timed(make, args.steps) for _ in range(args.repeats)]
        peaks = [r[1] for r in runs if r[1] is not None]
        results[label] = (statistics.median(r[0] for r in runs), max(peaks) if peaks else None)
    base_s, base_peak = results["plain generation"]
    print()
    print("| variant | ms/step | time ratio (target <= 2.1) | peak memory | memory ratio |")
    print("|---|---|---|---|---|")
    for label, (seconds, peak) in results.items():
        memory = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (CPU)"
        memory_ratio = f"{peak / base_peak:.3f}x" if peak is not None else "n/a"
        print(f"| {label} | {1000 * seconds / args.steps:.1f} | {seconds / base_s:.3f}x | {memory} | {memory_ratio} |")


if __name__ == "__main__":
    main()
