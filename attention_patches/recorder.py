"""The one attention recorder: running means of post-softmax attention maps.

Every technique that reads attention maps (segmentation, Cross-Image masks,
Bounded Attention's mask refinement, heat maps) reads them from an
`AttentionRecorder` registered on the router. For each recorded call it
computes `softmax(QKᵀ/√d + mask)` itself, for the conditional rows only,
averages over heads and adds the result into one running sum per
(kind, token grid), kind = "self" (`[HW, HW]`) or "cross" (`[HW, tokens]`), per
image of the batch. Nothing per step or per layer is kept: memory is one map
per recorded (kind, grid), whatever the number of steps and layers.

It runs innermost (highest `order`), so it sees q/k and the mask after every
other technique changed them, and it returns the chain's own output
(`attend`), so recording never changes what the model computes. Calls its
`selection` does not want cost one `wants()` check.

State lives on the recorder (shared by every clone of the model, see
router.py); `begin_run()` clears it when a sampling run starts and
`finish_run(result)` remembers which result the record belongs to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backend import attention_probabilities, mask_4d
from .call import AttentionCall
from .router import AttentionTechnique

SELF, CROSS = "self", "cross"
KINDS = (SELF, CROSS)

Grid = tuple  # (height, width) of a layer's token grid


@dataclass(frozen=True)
class RecordSelection:
    """Which calls are recorded.

    Defaults follow local-prompt-mixing's AttentionStore: self and cross
    attention of the encoder and decoder blocks ("down" and "up"; the middle
    block is left out), layers with at most 32² query tokens, every step.
    """

    kinds: frozenset = frozenset(KINDS)
    blocks: frozenset = frozenset({"input", "output"})
    max_tokens: int | None = 32 * 32
    layers: frozenset | None = None  # explicit (block, id, index) keys; None = every layer of `blocks`
    start: float = 0.0  # first recorded step, as a fraction of the schedule
    end: float = 1.0  # last recorded step, as a fraction of the schedule
    # record only calls whose transformer_options carry this key (a pass that asks to be recorded)
    only_with: str | None = None

    def __post_init__(self):
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {sorted(self.kinds)}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"recorded steps: need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive or None, got {self.max_tokens}")

    def covers(self, layer, tokens: int) -> bool:
        """Whether a layer (its key and its grid's token count) is one this selection records."""
        if self.layers is not None:
            if tuple(layer) not in self.layers:
                return False
        elif layer[0] not in self.blocks:
            return False
        return self.max_tokens is None or tokens <= self.max_tokens

    def matches(self, call: AttentionCall) -> bool:
        if self.only_with is not None and not call.options.get(self.only_with):
            return False
        if (SELF if call.is_self else CROSS) not in self.kinds:
            return False
        if not self.covers(call.layer, call.tokens):
            return False
        progress = call.progress
        if progress is None:  # no schedule (a direct model call): only an unrestricted range records
            return self.start == 0.0 and self.end == 1.0
        return self.start <= progress <= self.end


def halved_grid(latent: Grid, halvings: int) -> Grid:
    """The token grid of a layer that runs after `halvings` stride-2 downsamplings of a latent (rounding up)."""
    h, w = latent
    for _ in range(halvings):
        h, w = -(-h // 2), -(-w // 2)
    return (h, w)


FLOAT_BYTES = 4  # the record is float32 whatever the model's dtype


def record_bytes(selection: RecordSelection, layer_halvings: dict, latent: Grid, images: int, context_tokens: int = 77,
                 chunk_elements: int = 2**26) -> tuple[int, dict]:
    """What recording one run with `selection` holds in memory, before it runs.

    `layer_halvings` maps every attention layer key to the downsamplings before it (see
    nodes/patching.layer_downsampling), `latent` is the latent's (height, width). Returns
    (total bytes, {(kind, grid): bytes of its running sum}); the total adds the largest block of
    probabilities one call computes at once (at most `chunk_elements` floats).
    """
    maps = {}
    for layer, halvings in layer_halvings.items():
        grid = halved_grid(latent, halvings)
        tokens = grid[0] * grid[1]
        if not selection.covers(layer, tokens):
            continue
        for kind in selection.kinds:
            keys = tokens if kind == SELF else context_tokens
            maps[(kind, grid)] = images * tokens * keys * FLOAT_BYTES
    transient = min(chunk_elements * FLOAT_BYTES, max(maps.values(), default=0))
    return sum(maps.values()) + transient, maps


class AttentionRecorder(AttentionTechnique):
    """Running means of head-averaged attention maps, per (kind, grid), per image.

    Read with `grids(kind)`, `mean(kind, grid)` (`[images, HW, keys]`),
    `count(kind, grid)` (how many layer×step maps were averaged) and
    `closest_grid(kind, side)`. `result` is the sampling result the record
    belongs to (set by `finish_run`).
    """

    name = "recorder"
    order = 10_000  # innermost: sees q/k/mask after every other technique

    def __init__(self, selection: RecordSelection | None = None, chunk_elements: int = 2**26):
        self.selection = selection or RecordSelection()
        # bound on the logits held at once (rows × heads × queries × keys);
        # larger calls are computed in chunks of queries
        self.chunk_elements = chunk_elements
        self.begin_run()
        self.runs = 0

    # -- lifecycle ------------------------------------------------------------

    def begin_run(self) -> None:
        """Forget everything recorded: a new sampling run starts."""
        self._sums: dict[tuple[str, Grid], torch.Tensor] = {}
        self._counts: dict[tuple[str, Grid], int] = {}
        self.steps: set[int] = set()
        # (kind, grid) of the calls the selection left out: says why a record came out empty
        self.skipped: set[tuple[str, Grid]] = set()
        self.latent_shape: tuple | None = None
        self.result: torch.Tensor | None = None

    def finish_run(self, result: torch.Tensor) -> None:
        """Remember the sampled result this record belongs to (kept on the CPU)."""
        self.result = result.detach().to("cpu", torch.float32).clone()
        self.runs += 1

    def belongs_to(self, latent: torch.Tensor, atol: float = 1e-5) -> bool:
        """Whether `latent` is the result of the run that made this record."""
        if self.result is None:
            return False
        latent = latent.detach().to("cpu", torch.float32)
        return latent.shape == self.result.shape and torch.allclose(latent, self.result, rtol=0.0, atol=atol)

    # -- recording ------------------------------------------------------------

    def wants(self, call: AttentionCall) -> bool:
        if self.selection.matches(call):
            return True
        self.skipped.add((SELF if call.is_self else CROSS, (call.height, call.width)))
        return False

    def __call__(self, q, k, v, call: AttentionCall, attend, mask=None):
        rows = call.layout.rows(cond=True)
        if rows:
            self._record(q, k, call, rows, mask)
        return attend(q, k, v, mask)

    def _record(self, q, k, call: AttentionCall, rows: list[int], mask, kind: str | None = None) -> None:
        """Add the call's maps into the sums; `kind` overrides self/cross (a DiT's joint call gives both)."""
        batch = q.shape[0]
        index = torch.tensor(rows, device=q.device)
        q, k = q.index_select(0, index), k.index_select(0, index)
        if mask is not None:
            mask = mask_4d(mask)
            if mask.shape[0] == batch and batch > 1:  # a per-row mask: keep the recorded rows
                mask = mask.index_select(0, index.to(mask.device))
        kind = kind or (SELF if call.is_self else CROSS)
        grid = (call.height, call.width)
        images, queries, keys = call.layout.images, q.shape[1], k.shape[1]
        total = self._sum_for(kind, grid, images, queries, keys, q.device)
        step = max(1, self.chunk_elements // (len(rows) * call.heads * keys))
        for start in range(0, queries, step):
            stop = min(start + step, queries)
            part = mask
            if part is not None and part.shape[-2] == queries:
                part = part[..., start:stop, :]
            probs = attention_probabilities(q[:, start:stop], k, call.heads, part)
            # rows are cond chunks × images: add every chunk's heads into its images' sums (head
            # mean by alpha; slice by slice, in place: no full-size temporaries besides `probs`)
            into = total[:, start:stop]
            for chunk in range(len(rows) // images):
                for head in range(call.heads):
                    into.add_(probs[chunk * images:(chunk + 1) * images, head], alpha=1.0 / call.heads)
        self._counts[(kind, grid)] += len(rows) // images
        if call.step is not None:
            self.steps.add(call.step)
        if self.latent_shape is None and call.options.get("original_shape") is not None:
            self.latent_shape = tuple(call.options["original_shape"])

    def _sum_for(self, kind, grid, images, queries, keys, device) -> torch.Tensor:
        total = self._sums.get((kind, grid))
        if total is None:
            total = self._sums[(kind, grid)] = torch.zeros(images, queries, keys, device=device)
            self._counts[(kind, grid)] = 0
        elif total.shape != (images, queries, keys):
            raise ValueError(
                f"attention recorder: a {kind}-attention call at {grid[0]}x{grid[1]} has {images} image(s) and "
                f"{keys} keys, but this run recorded {total.shape[0]} image(s) and {total.shape[2]} keys there; "
                "a record belongs to one sampling run (begin_run() starts a new one)"
            )
        return total

    # -- reading --------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        return not self._sums

    def grids(self, kind: str) -> list[Grid]:
        """Token grids recorded for `kind`, largest first."""
        return sorted((g for (k, g) in self._sums if k == kind), key=lambda g: -g[0] * g[1])

    def count(self, kind: str, grid: Grid) -> int:
        return self._counts.get((kind, tuple(grid)), 0)

    def mean(self, kind: str, grid: Grid) -> torch.Tensor:
        """Mean map over recorded layers, steps and heads: `[images, HW, keys]`, float32, on the CPU."""
        key = (kind, tuple(grid))
        if key not in self._sums:
            have = ", ".join(f"{h}x{w}" for h, w in self.grids(kind)) or "none"
            raise ValueError(f"no {kind}-attention was recorded at {grid[0]}x{grid[1]} (recorded: {have})")
        return (self._sums[key] / self._counts[key]).cpu()

    def largest_grid(self, kind: str) -> Grid:
        """The recorded grid with the most tokens: local-prompt-mixing clusters the largest grid its
        store keeps (32² of SD1.4 at 512 px)."""
        grids = self.grids(kind)
        if not grids:
            raise ValueError(f"no {kind}-attention was recorded")
        return grids[0]

    def label_grid(self, self_grid: Grid, min_side: int = 8) -> Grid:
        """The cross-attention grid that labels segments clustered on `self_grid`, by role.

        local-prompt-mixing labels 32² clusters with the 16² cross-attention, the level below.
        That level is taken when it has at least `min_side` tokens a side; below that a grid
        cannot place a word on an object a quarter of the image wide (the demo model's 4² level
        under its 8² one scores AUC 0.5 against the objects, its 8² level 0.9), so the grid
        closest to `self_grid` labels instead.
        """
        grids = self.grids(CROSS)
        if not grids:
            raise ValueError("no cross-attention was recorded")
        below = [g for g in grids if g[0] * g[1] < self_grid[0] * self_grid[1] and min(g) >= min_side]
        return below[0] if below else self.closest_grid(CROSS, math.isqrt(self_grid[0] * self_grid[1]))

    def closest_grid(self, kind: str, side: int) -> Grid:
        """The recorded grid closest to side×side, by ratio of token counts (ties: the larger)."""
        grids = self.grids(kind)
        if not grids:
            raise ValueError(f"no {kind}-attention was recorded")
        return min(grids, key=lambda g: (abs(math.log(g[0] * g[1] / (side * side))), -g[0] * g[1]))
