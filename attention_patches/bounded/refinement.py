"""Bounded Attention's mask refinement (docs/methods.md §3): the subjects' shapes instead of their boxes.

From step `start_step` (15) on, rebuilt every `every` (5) steps, the subject
regions the masks use are no longer the boxes but the subjects' shapes: KMeans
(3·S clusters) on the running mean of the mask layers' self-attention, each
cluster given to the subject whose cross-attention mask covers it most,
background below 0.2; a subject left without a cluster falls back to its box.
The maps come from the shared `AttentionRecorder` (recorder.py), restricted to
denoising passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from ..recorder import CROSS, SELF, AttentionRecorder, RecordSelection
from ..segmentation import kmeans_segments
from .layout import BoundedLayout, box_masks, token_columns

@dataclass(frozen=True)
class RefinementConfig:
    """When and how the subject masks are refined (defaults: run_sd.py / run_xl.py and BoundedAttention's)."""

    start_step: int = 15  # first_refinement_step: the boxes are the regions before it
    every: int = 5  # delta_refine_mask_steps: rebuilt at the steps divisible by this
    clusters_per_subject: int = 3  # num_clusters_per_subject: KMeans runs with S·this clusters
    cross_threshold: float = 0.2  # cross_mask_threshold: midpoint of the sigmoid on the max-normalised cross map
    sharpness: float = 10.0  # scale of that sigmoid
    assignment_threshold: float = 0.2  # self_mask_threshold: a cluster covered less than this is background
    seed: int = 1  # KMeans seed

    def __post_init__(self):
        if self.start_step < 0 or self.every < 1 or self.clusters_per_subject < 1:
            raise ValueError("mask refinement needs start_step >= 0, every >= 1 and clusters_per_subject >= 1, got "
                             f"{self.start_step}, {self.every}, {self.clusters_per_subject}")

    def last_rebuild_step(self, total_steps: int) -> int | None:
        """The last step of a `total_steps` run at which the masks are rebuilt (None: never)."""
        if self.start_step >= total_steps:
            return None
        last_multiple = (total_steps - 1) // self.every * self.every
        return max(self.start_step, last_multiple)


def normalise_maps(maps: torch.Tensor, dim: int, reduce_min: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """The authors' map normalisation along `dim`: `m / (max m + ε)`, or `(m − min m) / (max m − min m + ε)`."""
    low = maps.amin(dim, keepdim=True) if reduce_min else 0.0
    return (maps - low) / (maps.amax(dim, keepdim=True) - low + eps)


def leading_token_maps(cross: torch.Tensor, leading_tokens: Sequence[int]) -> torch.Tensor:
    """`[..., S, N]`: each subject's leading-token column of a cross map `[..., N, K]` (its copies in every 77-token chunk added)."""
    columns = torch.stack([token_columns([t], cross.shape[-1], cross.device) for t in leading_tokens])  # [S, K]
    return torch.einsum("...nk,sk->...sn", cross, columns.to(cross.dtype))


def subject_cross_masks(cross_maps: torch.Tensor, existing: torch.Tensor, threshold: float = 0.2,
                        sharpness: float = 10.0) -> torch.Tensor:
    """Soft `[S, N]` masks: `minmax(sigmoid(sharpness·(m/max m − threshold))) · existing`.

    `cross_maps` `[S, N]` are the subjects' leading-token cross-attention maps;
    `existing` `[S, N]` bool are the regions in use (the boxes at the first
    refinement, the previous refined masks after), which confine each subject.
    """
    soft = torch.sigmoid(sharpness * (normalise_maps(cross_maps, -1) - threshold))
    return normalise_maps(soft, -1, reduce_min=True) * existing.to(soft.dtype)


def assign_clusters(labels: torch.Tensor, cross_masks: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """`[S, N]` bool: each cluster goes to the subject whose cross mask covers it most, or to the background.

    score(s, c) = Σ_{i∈c} cross_s[i] / min(Σ_i cross_s[i], |c|); a cluster goes to
    argmax_s score, unless that score is below `threshold`. `labels` `[N]` are
    cluster ids, `cross_masks` `[S, N]` soft masks in [0, 1].
    """
    members = F.one_hot(labels.long(), int(labels.max()) + 1).to(cross_masks.dtype)  # [N, C]
    overlap = cross_masks @ members  # [S, C]
    smaller = torch.minimum(cross_masks.sum(-1, keepdim=True), members.sum(0, keepdim=True))
    score, subject = (overlap / smaller.clamp_min(1e-12)).max(0)  # [C]
    owner = torch.where(score >= threshold, subject, -1)[labels.long()]  # [N]; -1 = background
    return owner[None, :] == torch.arange(cross_masks.shape[0], device=owner.device)[:, None]


def fall_back_to_boxes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """A subject whose mask `[S, N]` is empty gets its box, which every other subject's mask then leaves (in subject order)."""
    masks = masks.clone()
    for s in range(masks.shape[0]):
        if not masks[s].any():
            masks &= ~boxes[s]
            masks[s] = boxes[s]
    return masks


def refined_subject_masks(self_attention: torch.Tensor, cross_maps: torch.Tensor, boxes: torch.Tensor,
                          existing: torch.Tensor, grid: tuple[int, int], clusters: int,
                          config: RefinementConfig = RefinementConfig()) -> torch.Tensor:
    """One image's refined subject regions `[S, N]` bool, on the token grid of its maps.

    `self_attention` `[N, N]` (mean over the mask layers, steps and heads) is
    clustered row by row after normalising each key column by its maximum;
    `cross_maps` `[S, N]` are the leading tokens' mean cross-attention maps;
    `boxes` and `existing` `[S, N]` bool are the subjects' boxes and the regions
    in use. KMeans (sklearn, n_init 10, seeded) stands in for the authors'
    torch_kmeans (100 initialisations, then warm-started): both aim at the same
    minimum, ours is deterministic from the seed.
    """
    features = normalise_maps(self_attention.float(), -2)
    labels = kmeans_segments(features, grid, min(clusters, grid[0] * grid[1]), config.seed).flatten()
    cross = subject_cross_masks(cross_maps.float(), existing, config.cross_threshold, config.sharpness)
    return fall_back_to_boxes(assign_clusters(labels, cross, config.assignment_threshold), boxes)


def resize_regions(regions: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Regions `[..., S, h·w]` bool on `grid` as regions on a `size` grid (nearest-exact, as the authors)."""
    if tuple(grid) == tuple(size):
        return regions
    maps = regions.float().reshape(-1, regions.shape[-2], *grid)
    big = F.interpolate(maps, size=tuple(size), mode="nearest-exact")
    return big.reshape(*regions.shape[:-1], size[0] * size[1]).bool()


class MaskRefinement(AttentionRecorder):
    """The refinement as one technique: the mask layers' record and the regions rebuilt from it.

    As a recorder it averages the mask layers' maps of denoising passes only:
    the authors average the maps of un-optimised passes, so guidance passes
    (`guidance.collecting`) are skipped; so are the steps after the run's last
    rebuild, whose maps nobody reads (a run shorter than `start_step` records
    nothing). From `config.start_step` on, `refined` (`[images, S, h·w]` on
    `refined_grid`) holds the regions the masks use, rebuilt at the steps listed
    in `refinements`; `revision` changes whenever the regions do. `begin_run()`
    must start every sampling run.
    """

    name = "bounded_mask_refinement"

    def __init__(self, layout: BoundedLayout, layers, config: RefinementConfig = RefinementConfig(), guidance=None):
        if not layers:
            raise ValueError("bounded mask refinement needs mask layers to record")
        self.layout = layout
        self.config = config
        self.guidance = guidance  # the GuidanceProbe whose passes are not recorded (None: no guidance)
        self.revision = 0
        super().__init__(RecordSelection(layers=frozenset(map(tuple, layers)), max_tokens=None))

    def begin_run(self) -> None:
        """A sampling run starts: back to the boxes, and a fresh record."""
        super().begin_run()
        self.refined: torch.Tensor | None = None
        self.refined_grid: tuple[int, int] | None = None
        self.refinements: list[int] = []  # steps at which this run rebuilt the regions
        self._considered_step = None
        self.revision += 1

    def wants(self, call: AttentionCall) -> bool:
        guiding = self.guidance is not None and self.guidance.collecting
        if guiding or call.step is None or not call.total_steps:
            return False
        last = self.config.last_rebuild_step(call.total_steps)
        return last is not None and call.step < last and super().wants(call)

    def refresh(self, step: int | None) -> None:
        """At the first call of a refinement step: rebuild the regions from the recorded maps.

        As the authors: the first time at `start_step`, then at every step
        divisible by `every`, from the maps of the steps before (this step's
        are not recorded yet). Nothing recorded (this recorder is not on the
        router): the boxes stay.
        """
        config = self.config
        if step is None or step < config.start_step or step == self._considered_step:
            return
        self._considered_step = step
        if self.refined is not None and step % config.every:
            return
        if not self.grids(SELF) or not self.grids(CROSS):
            return
        grid = self.grids(SELF)[0]
        self_maps = self.mean(SELF, grid)  # [images, N, N]
        cross_maps = leading_token_maps(self.mean(CROSS, grid), self.layout.leading_tokens)  # [images, S, N]
        boxes = box_masks(self.layout.boxes, *grid)
        existing = self.refined if self.refined is not None else boxes.expand(self_maps.shape[0], *boxes.shape)
        clusters = config.clusters_per_subject * self.layout.subjects
        self.refined = torch.stack([
            refined_subject_masks(self_maps[i], cross_maps[i], boxes, existing[i], grid, clusters, config)
            for i in range(self_maps.shape[0])
        ])
        self.refined_grid = grid
        self.refinements.append(step)
        self.revision += 1

    def regions(self, images: int, size: tuple[int, int], device) -> torch.Tensor | None:
        """The refined regions `[images, S, N]` on a `size` grid, or None while the boxes are the regions."""
        if self.refined is None:
            return None
        if self.refined.shape[0] != images:
            raise ValueError(f"bounded attention: refined masks for {self.refined.shape[0]} image(s), but this call "
                             f"has {images}; begin_run() must start every sampling run")
        return resize_regions(self.refined, self.refined_grid, size).to(device)
