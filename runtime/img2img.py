"""Image to image: a photo enters the plan part-way through the global schedule (docs/ALGORITHM.md §14).

With N the plan's steps, `strength` runs n = min(int(N * strength), N) of them, as diffusers' img2img does: the
global list is unchanged and its first N - n steps are skipped. Stages whose steps are all skipped do not run;
the photo is resized to the entry stage's size as the pixel relay resizes, encoded (posterior mean, times c),
noised to the first step that runs with that stage's abar', and the rest of the plan runs as usual.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.plan import StagePlan
from ..engine.networks import Networks
from .fused_relay import relay_resize
from .image_files import read_rgb
from .schedule import StageSchedule


class ImageInputError(ValueError):
    """A photo, strength or start stage that cannot be used; the message names the bad value."""


@dataclass(frozen=True)
class EntryPoint:
    """Where the photo enters the plan."""

    stage: int
    """0-based index of the first stage that runs; earlier stages are skipped."""
    step: int
    """Steps of that stage skipped before the first step that runs."""
    global_step: int
    """Index of the first step that runs in the global timestep list."""


def steps_run(total: int, strength: float) -> int:
    """diffusers' `init_timestep = min(int(num_inference_steps * strength), num_inference_steps)`."""
    return min(int(total * strength), total)


def entry_point(plan: StagePlan, strength: float | None, start_stage: int | None = None) -> EntryPoint:
    """The stage and step the strength selects; `start_stage` (1-based) demands that stage and bounds the strength.

    strength None is 0.8 (diffusers' default) without a start stage, and the start stage's first step with one.

    Raises ImageInputError naming the bad value: a strength outside (0, 1], one that runs no step, a start stage
    outside 1..K, or a strength whose first step lies outside the start stage (the message gives the range)."""
    n_stages, total = len(plan.stages), plan.total_steps
    if start_stage is not None and not 1 <= start_stage <= n_stages:
        raise ImageInputError(f"--start-stage {start_stage}: the plan has stages 1 to {n_stages}")
    ranges = plan.step_ranges()
    if strength is None and start_stage is not None:
        n = total - ranges[start_stage - 1].start  # counted, not via a float that int() could round down
        strength = n / total
    else:
        strength = 0.8 if strength is None else strength
        if not (isinstance(strength, (int, float)) and 0 < strength <= 1):  # nan fails both comparisons
            raise ImageInputError(f"--strength {strength!r}: must be a number in (0, 1]")
        n = steps_run(total, strength)
    if n == 0:
        raise ImageInputError(f"--strength {strength:g}: runs int({total} * {strength:g}) = 0 of the plan's "
                              f"{total} steps; give at least {1 / total:.4g}")
    first = total - n
    k = next(i for i, r in enumerate(ranges) if first in r)
    if start_stage is not None and k != start_stage - 1:
        r = ranges[start_stage - 1]
        lo, hi = (total - r.stop + 1) / total, (total - r.start) / total
        raise ImageInputError(f"--strength {strength:g} starts at step {first + 1} of {total}, in stage {k + 1}, not "
                              f"--start-stage {start_stage}; stage {start_stage} takes strengths {lo:.4g} to {hi:.4g}")
    return EntryPoint(k, first - ranges[k].start, first)


def skip_steps(schedule: StageSchedule, steps: int) -> StageSchedule:
    """The stage's schedule without its first `steps` steps (same gamma, same timesteps after them)."""
    return dataclasses.replace(schedule, timesteps=schedule.timesteps[steps:], abar_t=schedule.abar_t[steps:],
                               abar_s=schedule.abar_s[steps:])


def read_image(path: str | Path) -> torch.Tensor:
    """A photo file as (1, 3, H, W) float32 in [-1, 1] (RGB; alpha dropped); ImageInputError names a bad file."""
    return read_rgb(path, "--image", ImageInputError) * 2.0 - 1.0  # as diffusers' image processor scales


def encode_image(nets: Networks, image: torch.Tensor, height: int, width: int, scaling: float,
                 device) -> torch.Tensor:
    """c * mean(E(clamp(bicubic(clamp(image))))) at (height, width): the pixel relay's resize and encode."""
    return nets.vae_encode(relay_resize(image.to(device), height, width, nets.vae_dtype)) * scaling


@dataclass(frozen=True)
class ImageStart:
    """A photo to start from: `MegaFusionPipeline.generate(..., image=ImageStart(...))`."""

    image: torch.Tensor
    """(1, 3, H, W) float32 in [-1, 1], any size: it is resized to the entry stage's size."""
    strength: float | None = None
    """Fraction of the plan's steps that run; None: 0.8 (diffusers'), or the start stage's first step."""
    start_stage: int | None = None
    """1-based stage the photo must enter at, or None for the stage the strength selects."""

    def entry(self, plan: StagePlan) -> EntryPoint:
        return entry_point(plan, self.strength, self.start_stage)
