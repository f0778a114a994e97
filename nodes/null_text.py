"""Null-text optimisation (inversion/null_text.py) on a ComfyUI model, for Prompt-to-Prompt on a real image.

The optimisation differentiates the UNet with respect to the unconditional
embedding. Models that ComfyUI loads inside a node hold inference tensors, which
autograd cannot save for the backward pass; a clone of the model with a weight
wrapper (`ModelPatcher.add_weight_wrapper`, the mechanism ComfyUI's own training
node uses) hands each layer an ordinary copy of its weight during the pass. The
optimised embeddings then replace the unconditional rows' context at each step
through an APPLY_MODEL wrapper on the sampling model.
"""

from __future__ import annotations

import comfy.model_management
import comfy.patcher_extension
import torch

from ..attention_patches.call import ChunkLayout
from ..inversion import Inversion
from ..inversion.null_text import optimise_null_text

WRAPPER_KEY = "attention_lab.null_text"


def _ordinary_copy(weight: torch.Tensor) -> torch.Tensor:
    return weight.clone()


def differentiable(model):
    """A clone of `model` whose layers compute with ordinary (autograd-savable) copies of their weights."""
    patched = model.clone()
    for name, module in patched.model.named_modules():
        if name.startswith("diffusion_model.") and hasattr(module, "weight_function"):
            for kind in ("weight", "bias"):
                if getattr(module, kind, None) is not None:
                    patched.add_weight_wrapper(f"{name}.{kind}", _ordinary_copy)
    return patched


def model_conditioning(model, conditioning, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cross-attention context, SDXL ADM vector or None) of a one-row conditioning, as the model builds them,
    repeated to `rows`."""
    cond, extra = conditioning[0][0], dict(conditioning[0][1])
    extra.pop("cross_attn", None)
    conds = model.model.extra_conds(cross_attn=cond[:1], **extra)
    adm = conds.get("y")
    context = conds["c_crossattn"].cond
    return context.repeat(rows, 1, 1), None if adm is None else adm.cond[:1].repeat(rows, 1)


def null_text_embeddings(model, inversion: Inversion, source, negative, cfg: float) -> list[torch.Tensor]:
    """Per sampling step of the inversion, the optimised unconditional context `[images, tokens, channels]`."""
    images = inversion.latents.shape[1]
    grad_model = differentiable(model)
    comfy.model_management.load_models_gpu([grad_model])
    device = grad_model.load_device
    context, adm = model_conditioning(grad_model, source, images)
    null, null_adm = model_conditioning(grad_model, negative, images)
    diffusion = grad_model.model

    def denoise(x, sigma, embedding):
        uncond = embedding is not None
        kwargs = {} if adm is None else {"y": (null_adm if uncond else adm).to(device)}
        return diffusion.apply_model(x.to(device), sigma.to(device),
                                     c_crossattn=(embedding if uncond else context).to(device), **kwargs)

    order = torch.argsort(inversion.sigmas, descending=True)
    pivot = inversion.latents[order].to(device)
    return [e.to(comfy.model_management.intermediate_device())
            for e in optimise_null_text(denoise, pivot, inversion.sigmas[order], null.float().to(device), cfg)]


class NullTextContext:
    """APPLY_MODEL wrapper: the unconditional rows' context is the step's optimised null-text embedding."""

    def __init__(self, embeddings: list[torch.Tensor], sampling_sigmas: torch.Tensor, group: int):
        self.embeddings, self.sigmas, self.group = embeddings, sampling_sigmas, group

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        layout = ChunkLayout.of(x.shape[0], transformer_options.get("cond_or_uncond"))
        rows = layout.rows(cond=False)
        if rows and c_crossattn is not None:
            step = int(torch.argmin((self.sigmas[:-1] - float(t.reshape(-1)[0])).abs()))
            per_image = self.embeddings[step]
            images = [i // self.group for c in layout.chunks(cond=False) for i in range(layout.images)]
            embedding = per_image[images].to(c_crossattn)
            if embedding.shape[1] != c_crossattn.shape[1]:
                raise ValueError("PromptToPromptEditInversion: null_text: the negative and the prompts encode to "
                                 "different token lengths; keep each prompt under 75 tokens")
            c_crossattn = c_crossattn.clone()
            c_crossattn[rows] = embedding
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def __deepcopy__(self, memo):
        return self


def add_null_text(model, embeddings: list[torch.Tensor], sampling_sigmas: torch.Tensor, group: int) -> None:
    """Wrap `model` (a clone this node owns) so its unconditional rows take the per-step embeddings."""
    wrappers = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    model.remove_wrappers_with_key(wrappers, WRAPPER_KEY)
    model.add_wrapper_with_key(wrappers, WRAPPER_KEY, NullTextContext(embeddings, sampling_sigmas, group))
