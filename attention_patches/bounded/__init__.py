"""Bounded Attention (Dahary et al., 2024; omer11a/bounded-attention): plain torch (docs/methods.md §3).

Several subjects, each in its box, without leakage between them. The pieces,
one module each, composed on one router:

- `layout`: the subjects' tokens and boxes (`BoundedLayout`) and the masks they
  give to cross- and self-attention;
- `masks`: `BoundedAttention`, the technique that puts those masks on every
  attention layer at every step;
- `guidance`: `GuidanceProbe`, the technique that reads the loss layers'
  attention during a guidance pass, and `guided_latent`, the gradient steps on
  the latent (`z ← z − η_i ∇_z L` at steps i < `steps`);
- `losses`: the bounded loss and the two baselines the paper compares with
  (Layout Guidance, Chen et al.; Attend-and-Excite, Chefer et al.);
- `refinement`: `MaskRefinement`, the technique that records the mask layers'
  maps and rebuilds the subject regions from them (KMeans) from step 15 on;
- `layers`: the authors' layer sets per UNet family, and the memory it all needs.

Register the masks first, then the probe (same order: it runs just inside the
masks), then the refinement; call `begin_run()` on the refinement at the start
of every sampling run.

Where the pack differs from the authors' code, and why:
- wherever nothing further in needs the whole call, the masks are applied in
  structured form instead of as additive masks (dense N×N for self-attention,
  `[B, N, keys]` for cross-attention): per group of queries held by the same
  subjects, one attention call over only the keys that group may see, gathered
  (`BoundedAttention.gathered_attention`): the same result (a masked key's
  weight is exactly 0), O(N) indices instead of masks, and no mask handed to the
  backend, so fused kernels (FlashAttention) stay eligible;
- a box that rounds to no cell on a coarse grid keeps the cell at its centre
  (`box_masks`; their grids never empty a box);
- below the authors' image size the loss also reads the layers at their grids
  (`loss_layers_for`); at their size and above, their blocks exactly;
- Layout Guidance sums its per-image losses where theirs averages the batch.

On the demo model (benchmarks/quality.py) the masks cannot stop leakage: its small
text encoder routes 65-99% of the cross-attention to the padding after EOS (SD1's
tokenizer pads with the end token, which a causal encoder fills with the whole
prompt), which the masks leave open to every pixel, as the authors leave padding
open; closing it starves the image (no object, no background). Placement comes
from the guidance.
"""

from .guidance import (
    GuidanceConfig,
    GuidanceProbe,
    LossLayersDone,
    autograd_enabled,
    guided_latent,
    sampler_consistent_denoised,
)
from .layers import (
    AUTHORS_LATENT,
    DOWNSAMPLE,
    LOSS_LAYERS,
    MASK_LAYERS,
    STEP_SIZES,
    UnsupportedFamilyError,
    largest_fitting_latent,
    layer_tokens,
    loss_layers_for,
    memory_needed,
    unet_family,
)
from .layout import (
    CHUNK_TOKENS,
    Box,
    BoundedLayout,
    additive,
    box_masks,
    check_box,
    cross_attention_allowed,
    self_attention_allowed,
    self_attention_groups,
    token_columns,
)
from .losses import (
    LOSSES,
    AttendExciteLoss,
    BoundedLoss,
    LayerProbs,
    LayoutGuidanceLoss,
    bounded_shares,
    floor_box_masks,
    gaussian_kernel,
    gaussian_smooth,
    iou_loss,
    region_sums,
)
from .masks import BoundedAttention
from .refinement import (
    MaskRefinement,
    RefinementConfig,
    assign_clusters,
    fall_back_to_boxes,
    leading_token_maps,
    normalise_maps,
    refined_subject_masks,
    resize_regions,
    subject_cross_masks,
)
