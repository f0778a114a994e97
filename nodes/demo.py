"""DemoModelLoader: the pack's built-in model, so example workflows run anywhere."""

from __future__ import annotations

from comfy_api.latest import io

from . import tiny_models


class DemoModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DemoModelLoader",
            display_name="Demo Model Loader (Attention Lab)",
            category="attention_lab/loaders",
            description=(
                "Loads the pack's small built-in SD1.5-architecture model (UNet, CLIP text encoder, "
                "TAESD VAE) so the example workflows run on any machine without a download. "
                "Until the trained demo weights ship, the weights are seeded random: images are "
                "noise, every patch path is the real one. Swap in CheckpointLoaderSimple for a real "
                "SD1.5/SDXL checkpoint."
            ),
            inputs=[
                io.Int.Input(
                    "weights_seed", default=0, min=0, max=2**31 - 1,
                    tooltip="Seed of the random weights (used until the trained demo weights ship).",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The demo UNet (SD1.5 architecture, 16 attention layers)."),
                io.Clip.Output(tooltip="The demo text encoder: the standard CLIP tokenizer over a small CLIP text model."),
                io.Vae.Output(tooltip="The demo VAE (TAESD architecture, 8x downscale, 4 latent channels)."),
            ],
        )

    @classmethod
    def execute(cls, weights_seed: int) -> io.NodeOutput:
        return io.NodeOutput(
            tiny_models.sd15_unet(seed=weights_seed),
            tiny_models.text_encoder(seed=weights_seed + 1),
            tiny_models.taesd_vae(seed=weights_seed + 2),
        )
