"""The one mechanism through which every technique touches attention.

A model clone gets one `AttentionRouter`. It owns an attn1 and an attn2 replace
patch (`LayerPatch`) for every transformer layer of the UNet, and sends each call
through the techniques registered on it, in their `order`, ending at the
attention backend, or at the patch another pack had set on that layer before us.

Deep copies (ModelPatcher.clone() deep-copies model_options) give the clone its
own router, holding the same technique objects: registering a technique on a
clone never reaches the model it was cloned from, and state a technique keeps
(a recorder's aggregate, a trajectory) is not silently detached.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import torch

from .backend import sdpa_attention
from .call import AttentionCall, ChunkLayout, Layer, StepClock, execution_order, spatial_size

log = logging.getLogger("attention_lab")

# next(q, k, v, mask=None) -> out: the rest of the chain, as a technique sees it
Attend = Callable[..., torch.Tensor]


class AttentionTechnique:
    """Base of every technique: one object, state explicit, a uniform call.

    `wants(call)` is a cheap filter (layer, step, self/cross); `__call__` gets
    projected q/k/v `[B, N, heads*dim_head]`, the additive mask set so far by
    techniques further out (None if none), and `attend(q, k, v, mask)`, the rest
    of the chain; it returns the attention output in q's layout. A technique may
    change q/k/v, add its own mask (`combine_masks`), or post-process the result.
    Lower `order` runs first (outermost). `families` are the model families
    ("unet", "flux", "sd3") whose attention the technique understands; registering
    it on a router of another family is refused (`UnsupportedFamilyError`).
    """

    name = "technique"
    order = 100
    families: frozenset[str] = frozenset({"unet"})

    def wants(self, call: AttentionCall) -> bool:
        return True

    def __call__(self, q, k, v, call: AttentionCall, attend: Attend, mask=None) -> torch.Tensor:
        return attend(q, k, v, mask)

    def __deepcopy__(self, memo):
        # Shared by every clone of the model it is registered on (see module doc).
        return self


class LayerPatch:
    """The replace patch the router sets on one (layer, attn1|attn2) key.

    Callable with ComfyUI's replace-patch signature, so a pack patching the same
    layer after us can chain to it like to any other patch.
    """

    def __init__(self, router: "AttentionRouter", layer: Layer, is_self: bool, previous=None):
        self.router = router
        self.layer = tuple(layer)
        self.is_self = is_self
        self.previous = previous

    def __call__(self, q, k, v, extra_options, mask=None):
        return self.router.dispatch(self, q, k, v, extra_options, mask)

    def __repr__(self):
        kind = "attn1" if self.is_self else "attn2"
        chained = f" -> {self.previous!r}" if self.previous is not None else ""
        return f"LayerPatch({kind} {self.layer}{chained})"


class UnsupportedFamilyError(ValueError):
    pass


FAMILY_NAMES = {"unet": "SD1.x/SD2.x/SDXL UNet", "flux": "Flux", "sd3": "SD3"}


def family_names(families: Iterable[str]) -> str:
    return ", ".join(FAMILY_NAMES.get(f, f) for f in sorted(families))


class AttentionRouter:
    """Dispatches every attention call of a patched model to its techniques.

    `family` is the architecture whose attention it routes: "unet" (replace patches
    per layer, `LayerPatch`) or a DiT ("flux", "sd3": attention_patches/dit.py feeds
    the same `route` from ComfyUI's attention override).
    """

    def __init__(self, layers: Sequence[Layer], attention: Callable = sdpa_attention, family: str = "unet"):
        self.family = family
        self.layers = execution_order(layers)
        self.ordinal = {layer: i for i, layer in enumerate(self.layers)}
        self.attention = attention
        self.techniques: list[AttentionTechnique] = []
        self._clock = StepClock()
        self._warned: set = set()
        self._running: set = set()

    def __deepcopy__(self, memo):
        clone = AttentionRouter.__new__(AttentionRouter)
        memo[id(self)] = clone
        clone.family = self.family
        clone.layers = self.layers
        clone.ordinal = self.ordinal
        clone.attention = self.attention
        clone.techniques = list(self.techniques)
        clone._clock = StepClock()
        clone._warned = set()
        clone._running = set()
        return clone

    # -- registration -------------------------------------------------------

    def add(self, technique: AttentionTechnique) -> AttentionTechnique:
        """Register a technique; techniques run in (order, registration) order.

        Raises UnsupportedFamilyError when the technique does not support this model family.
        """
        if self.family not in technique.families:
            raise UnsupportedFamilyError(
                f"{technique.name}: the model is {FAMILY_NAMES.get(self.family, self.family)}, and {technique.name} "
                f"supports {family_names(technique.families)} models only"
            )
        self.techniques.append(technique)
        self.techniques.sort(key=lambda t: t.order)  # stable: ties keep registration order
        return technique

    def remove(self, technique: AttentionTechnique) -> None:
        self.techniques.remove(technique)

    def patch_for(self, layer: Layer, is_self: bool, previous=None) -> LayerPatch:
        if tuple(layer) not in self.ordinal:
            raise KeyError(f"layer {layer} is not one of this router's layers")
        return LayerPatch(self, layer, is_self, previous)

    # -- dispatch -----------------------------------------------------------

    def dispatch(self, patch: LayerPatch, q, k, v, options: dict, mask=None) -> torch.Tensor:
        base = self._base(patch, options)
        key = (patch.layer, patch.is_self)
        # A pack that chained to our patch and was then chained under ours again
        # (ours -> theirs -> ours) must not run our techniques twice.
        if not self.techniques or key in self._running:
            return base(q, k, v, mask)
        return self.route(key, self.describe(patch, q, options), base, q, k, v, mask)

    def route(self, key, call: AttentionCall, base: Attend, q, k, v, mask=None) -> torch.Tensor:
        """Run the techniques that want `call`, ending at `base`; `key` guards against re-entry."""
        if key in self._running:
            return base(q, k, v, mask)
        active = [t for t in self.techniques if t.wants(call)]
        if not active:
            return base(q, k, v, mask)
        self._running.add(key)
        try:
            return self._chain(active, call, base)(q, k, v, mask)
        finally:
            self._running.discard(key)

    def describe(self, patch: LayerPatch, q: torch.Tensor, options: dict) -> AttentionCall:
        heads = int(options["n_heads"])
        h, w = spatial_size(options, q.shape[1])
        step, total, sigma = self._clock.read(options)
        return AttentionCall(
            layer=patch.layer,
            ordinal=self.ordinal[patch.layer],
            num_layers=len(self.layers),
            is_self=patch.is_self,
            height=h,
            width=w,
            heads=heads,
            dim_head=int(options.get("dim_head", q.shape[-1] // heads)),
            step=step,
            total_steps=total,
            sigma=sigma,
            layout=ChunkLayout.of(q.shape[0], options.get("cond_or_uncond")),
            options=options,
        )

    def _chain(self, active: list[AttentionTechnique], call: AttentionCall, base: Attend) -> Attend:
        attend = base
        for technique in reversed(active):
            attend = _bind(technique, call, attend)
        return attend

    def _base(self, patch: LayerPatch, options: dict) -> Attend:
        previous = patch.previous
        heads = options["n_heads"]
        precision = options.get("attn_precision")

        def attend(q, k, v, mask=None):
            if previous is not None:
                if mask is None:
                    return previous(q, k, v, options)
                # A foreign replace patch has no mask argument: honour our mask
                # rather than drop it, and say so once per layer.
                self._warn_once(
                    ("mask", patch.layer, patch.is_self),
                    f"attention mask at {patch.layer}: the replace patch another node set there "
                    f"({previous!r}) takes no mask, so masked calls of this layer use ComfyUI attention",
                )
            return self.attention(q, k, v, heads, mask=mask, attn_precision=precision, transformer_options=options)

        return attend

    def _warn_once(self, key, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("[Attention Lab] %s", message)


def _bind(technique: AttentionTechnique, call: AttentionCall, attend: Attend) -> Attend:
    def step(q, k, v, mask=None):
        return technique(q, k, v, call, attend, mask)

    return step


def combine_masks(a, b):
    """Sum of two additive masks (either may be None); shapes broadcast."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def find_router(replace_patches: dict) -> AttentionRouter | None:
    """The router already installed in a `patches_replace` dict, if any."""
    for kind in ("attn1", "attn2"):
        for patch in replace_patches.get(kind, {}).values():
            if isinstance(patch, LayerPatch):
                return patch.router
    for patch in replace_patches.get("dit", {}).values():  # a DiT's block patches (attention_patches/dit.py)
        router = getattr(patch, "router", None)
        if isinstance(router, AttentionRouter):
            return router
    return None


def install(
    replace_patches: dict,
    set_patch: Callable[[LayerPatch, str, Layer], None],
    layers: Iterable[Layer],
    attention: Callable = sdpa_attention,
) -> AttentionRouter:
    """Install (or find) the router on a model's replace patches.

    `replace_patches` is the model's `transformer_options["patches_replace"]`
    (read only); `set_patch(patch, "attn1"|"attn2", layer)` stores a patch
    through the host's API. A patch another pack already set on a layer (under
    the 3-part key or ComfyUI's 2-part fallback) becomes that layer's base, so
    it still runs after our techniques.
    """
    layers = list(layers)
    router = find_router(replace_patches)
    if router is None:
        router = AttentionRouter(layers, attention)
    for layer in router.layers:
        for kind, is_self in (("attn1", True), ("attn2", False)):
            existing = replace_patches.get(kind, {})
            current = existing.get(tuple(layer), existing.get(tuple(layer[:2])))
            if isinstance(current, LayerPatch) and current.router is router:
                continue  # already routed
            set_patch(router.patch_for(layer, is_self, previous=current), kind, layer)
    return router
