"""Which step of a sampler's σ schedule a model call belongs to: the one lookup every technique shares.

Plain torch; `inversion/` uses it too, for the stored step nearest to a σ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Relative distance under which a σ counts as the schedule's own entry (see `step_index`).
SIGMA_RTOL = 1e-4


def _as_float(sigma: float | Tensor) -> float:
    if isinstance(sigma, Tensor):
        if sigma.numel() == 0:
            raise ValueError("sigma: got an empty tensor")
        return float(sigma.reshape(-1)[0])
    return float(sigma)


def step_index(schedule: Tensor | Sequence[float], sigma: float | Tensor, on_schedule: bool = False) -> int | None:
    """The index of the entry of `schedule` nearest to `sigma`: the step a model call at `sigma` belongs to.

    The rule:

    - nearest by absolute difference, computed in float64 on the CPU: a float32 or
      fp16/bf16 schedule compared with a float32 σ, or a huge σ ("the noisiest"),
      never ties entries that differ;
    - any order: a descending sampling schedule (its trailing 0 is index len − 1,
      the end of the last step) and an ascending inversion schedule alike;
    - ties go to the first entry: a σ listed twice (a schedule whose last σ is
      repeated) belongs to the earlier step, so a step index never skips ahead;
    - off the schedule (Heun's or DPM2's intermediate evaluations, a σ from another
      run's schedule) the nearest entry is still returned, unless `on_schedule`:
      then None unless |σ − entry| ≤ tolerance · max(σ, entry), where the tolerance
      is `SIGMA_RTOL`, or the machine epsilon of a coarser schedule or σ dtype
      (fp16: 9.8e-4, bf16: 7.8e-3) so a rounded schedule still meets its own σ.

    `sigma` may be a float or a tensor of one σ per batch row (ComfyUI's `timestep`),
    read at its first row. Raises ValueError on an empty or non-1-D schedule.
    """
    values = torch.as_tensor(schedule)
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"schedule: expected a 1-D schedule of sigmas, got shape {tuple(values.shape)}")
    target = _as_float(sigma)
    distances = (values.detach().to("cpu", torch.float64) - target).abs()
    # argmin returns the first of equal minima: ties go to the earlier step
    index = int(torch.argmin(distances))
    if not on_schedule:
        return index
    dtypes = [values.dtype] + ([sigma.dtype] if isinstance(sigma, Tensor) else [])
    tolerance = max([SIGMA_RTOL] + [torch.finfo(d).eps for d in dtypes if d.is_floating_point])
    nearest = float(values[index])
    if float(distances[index]) > tolerance * max(abs(target), abs(nearest)):
        return None
    return index
