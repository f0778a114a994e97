"""What a technique knows about one attention call.

ComfyUI passes a loose `extra_options` dict to a replace patch; `AttentionCall`
turns it into named facts (which layer, which step, which rows of the batch are
which image) so that techniques never re-derive them, and derive them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .schedule import step_index

Layer = tuple  # (block_name, block_id, block_index), ComfyUI's replace-patch key

# UNet blocks, then a DiT's blocks (Flux runs its double-stream blocks before its single-stream ones).
_BLOCK_ORDER = {"input": 0, "middle": 1, "output": 2, "double_block": 3, "single_block": 4}


def execution_order(layers: Sequence[Layer]) -> list[Layer]:
    """UNet transformer layers in the order a forward pass runs them.

    The papers number layers this way (e.g. "the first decoder block"), so the
    router gives every layer its ordinal in this order.
    """
    return sorted(set(map(tuple, layers)), key=lambda l: (_BLOCK_ORDER[l[0]], l[1], l[2]))


@dataclass(frozen=True)
class ChunkLayout:
    """How the rows of a batched UNet call map to images.

    ComfyUI concatenates chunks (`cond_or_uncond`: 0 = conditional, 1 =
    unconditional), each holding the same `images` latents in order. The usual
    CFG call is `[uncond×B, cond×B]`, but cfg == 1 drops the uncond chunk, low
    memory splits the two into separate calls, and area/multi conds add chunks:
    techniques address rows through this object, never through `b // 2`.
    """

    cond_or_uncond: tuple[int, ...]
    images: int

    @classmethod
    def of(cls, batch: int, cond_or_uncond: Sequence[int] | None) -> "ChunkLayout":
        # Outside ComfyUI's samplers (a direct model call) there is no layout:
        # treat the batch as one conditional chunk.
        chunks = tuple(cond_or_uncond) if cond_or_uncond else (0,)
        if batch % len(chunks):
            raise ValueError(f"batch of {batch} rows does not split into {len(chunks)} chunks {chunks}")
        return cls(chunks, batch // len(chunks))

    def row(self, chunk: int, image: int) -> int:
        return chunk * self.images + image

    def chunk_rows(self, chunk: int) -> slice:
        return slice(chunk * self.images, (chunk + 1) * self.images)

    def chunks(self, cond: bool | None = None) -> list[int]:
        """Chunk positions, optionally only the conditional (True) or unconditional (False) ones."""
        want = None if cond is None else (0 if cond else 1)
        return [i for i, c in enumerate(self.cond_or_uncond) if want is None or c == want]

    def rows(self, cond: bool | None = None) -> list[int]:
        """Batch rows of the conditional / unconditional / all chunks."""
        return [self.row(c, i) for c in self.chunks(cond) for i in range(self.images)]


@dataclass
class AttentionCall:
    """One call of one attention layer, as a technique sees it."""

    layer: Layer
    ordinal: int
    num_layers: int
    is_self: bool
    height: int
    width: int
    heads: int
    dim_head: int
    step: int | None
    total_steps: int | None
    sigma: float | None
    layout: ChunkLayout
    options: dict = field(repr=False)
    # The model family ("unet", "flux", "sd3"). In a DiT's joint attention the sequence is
    # [text_tokens text tokens | height×width image tokens | any further tokens (e.g. Flux
    # Kontext's reference images)]; on a UNet, text_tokens is 0 and the sequence is the image.
    family: str = "unet"
    text_tokens: int = 0
    joint: bool = False

    @property
    def tokens(self) -> int:
        """Image tokens of this call (the latent's token grid)."""
        return self.height * self.width

    @property
    def image_tokens(self) -> slice:
        """Where the image grid's tokens sit in the sequence."""
        return slice(self.text_tokens, self.text_tokens + self.tokens)

    @property
    def progress(self) -> float | None:
        """Fraction of the schedule done, 0 at the first step; None outside sampling."""
        if self.step is None or not self.total_steps:
            return None
        return self.step / self.total_steps

    @property
    def attn_precision(self):
        return self.options.get("attn_precision")


def spatial_size(options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of the token grid of this layer.

    `activations_shape` is set by ComfyUI's SpatialTransformer for the layer
    being run; fall back to the latent's aspect ratio (`original_shape`) when
    a caller did not set it.
    """
    shape = options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == tokens:
        return int(shape[-2]), int(shape[-1])
    latent = options.get("original_shape")
    if latent is not None:
        lh, lw = latent[-2], latent[-1]
        for down in (1, 2, 4, 8, 16, 32, 64):
            h, w = -(-lh // down), -(-lw // down)
            if h * w == tokens:
                return h, w
    side = int(round(tokens ** 0.5))
    if side * side == tokens:
        return side, side
    raise ValueError(f"cannot tell the spatial size of a layer with {tokens} tokens")


class StepClock:
    """Step index and σ of the current model call, computed once per call.

    Every layer of one UNet forward shares the same `sigmas` tensor object, so
    the (GPU-syncing) lookup runs once per forward, not once per layer.
    """

    def __init__(self):
        self._key = None
        self._value = (None, None, None)

    def read(self, options: dict) -> tuple[int | None, int | None, float | None]:
        sigmas = options.get("sigmas")
        schedule = options.get("sample_sigmas")
        if sigmas is None:
            return None, None, None
        if self._key is not None and self._key[0] is sigmas and self._key[1] is schedule:
            return self._value
        sigma = float(sigmas.reshape(-1)[0])
        if schedule is None:
            value = (None, None, sigma)
        else:
            value = (step_index(schedule, sigma), len(schedule) - 1, sigma)
        # Hold the tensors themselves so their ids cannot be reused by new ones.
        self._key, self._value = (sigmas, schedule), value
        return value
