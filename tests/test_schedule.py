"""The one σ → step lookup (attention_patches/schedule.py), on the schedules samplers and inversions hand it."""

import math

import pytest
import torch

from attention_lab.attention_patches.schedule import SIGMA_RTOL, step_index

# SD1.5's ddim_uniform sigmas for 5 steps, descending to the trailing 0
SAMPLING = torch.tensor([14.6146, 4.0861, 1.6981, 0.7393, 0.2998, 0.0], dtype=torch.float32)


def test_every_entry_of_a_descending_schedule_is_its_own_step():
    for k, sigma in enumerate(SAMPLING.tolist()):
        assert step_index(SAMPLING, sigma) == k
        assert step_index(SAMPLING, sigma, on_schedule=True) == k
    # the trailing 0 is the end of the last step: index len − 1 = the number of steps
    assert step_index(SAMPLING, 0.0) == len(SAMPLING) - 1


def test_a_batch_of_sigmas_is_read_at_its_first_row():
    timestep = torch.full((3,), float(SAMPLING[2]))
    assert step_index(SAMPLING, timestep) == 2
    assert step_index(SAMPLING.tolist(), float(SAMPLING[4])) == 4  # a plain list of floats


def test_off_the_schedule_the_nearest_entry_unless_on_schedule_is_asked():
    # DPM2 / Heun evaluate between two entries: the geometric midpoint of steps 1 and 2
    midpoint = math.sqrt(float(SAMPLING[1]) * float(SAMPLING[2]))
    nearest = 1 if abs(midpoint - float(SAMPLING[1])) < abs(midpoint - float(SAMPLING[2])) else 2
    assert step_index(SAMPLING, midpoint) == nearest
    assert step_index(SAMPLING, midpoint, on_schedule=True) is None
    # just inside / just outside the tolerance of an entry
    sigma = float(SAMPLING[3])
    assert step_index(SAMPLING, sigma * (1 + 0.5 * SIGMA_RTOL), on_schedule=True) == 3
    assert step_index(SAMPLING, sigma * (1 + 3 * SIGMA_RTOL), on_schedule=True) is None
    assert step_index(SAMPLING, sigma * (1 + 3 * SIGMA_RTOL)) == 3
    # beyond both ends
    assert step_index(SAMPLING, 1000.0) == 0 and step_index(SAMPLING, 1000.0, on_schedule=True) is None
    assert step_index(SAMPLING, -1.0) == len(SAMPLING) - 1


def test_ties_go_to_the_earlier_step():
    # exactly halfway between two entries
    schedule = torch.tensor([4.0, 2.0, 1.0, 0.0])
    assert step_index(schedule, 1.5) == 1
    assert step_index(schedule, 0.5) == 2
    # a schedule whose last σ is listed twice: the σ belongs to the first of the two steps
    repeated = torch.tensor([4.0, 2.0, 0.5, 0.5, 0.0])
    assert step_index(repeated, 0.5) == 2
    assert step_index(repeated, 0.5, on_schedule=True) == 2


def test_ascending_inversion_schedules():
    ascending = SAMPLING.flip(0)
    for k, sigma in enumerate(ascending.tolist()):
        assert step_index(ascending, sigma) == k
    assert step_index(ascending, 0.0) == 0


def test_a_huge_sigma_does_not_tie_neighbouring_entries():
    # 1e9 − 14.6146 and 1e9 − 4.0861 round to the same float32; in float64 the first entry is nearer
    assert step_index(SAMPLING, 1e9) == 0
    assert step_index(SAMPLING.flip(0), 1e9) == len(SAMPLING) - 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_rounded_schedule_meets_the_float32_sigmas_it_was_rounded_from(dtype):
    rounded = SAMPLING.to(dtype)
    for k, sigma in enumerate(SAMPLING.tolist()):
        # float32 σ against its fp16/bf16 rounding: off by up to half an ulp, more than SIGMA_RTOL
        assert step_index(rounded, sigma, on_schedule=True) == k
        # and a rounded σ against the float32 schedule
        assert step_index(SAMPLING, torch.tensor([sigma], dtype=dtype), on_schedule=True) == k
    assert abs(float(rounded[0]) - float(SAMPLING[0])) > SIGMA_RTOL * float(SAMPLING[0])  # the case is real
    midpoint = math.sqrt(float(SAMPLING[1]) * float(SAMPLING[2]))
    assert step_index(rounded, midpoint, on_schedule=True) is None


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="schedule: expected a 1-D schedule"):
        step_index(torch.tensor([]), 1.0)
    with pytest.raises(ValueError, match="schedule: expected a 1-D schedule"):
        step_index(torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="sigma: got an empty tensor"):
        step_index(SAMPLING, torch.tensor([]))
