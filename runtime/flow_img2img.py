"""Image to image for SD3 and FLUX: a photo enters the flow plan part-way through the global list
(docs/ALGORITHM.md §18.1), as diffusers' StableDiffusion3Img2ImgPipeline and FluxImg2ImgPipeline enter theirs.

With N the plan's steps, those pipelines skip the first t_start = int(max(N - min(N * strength, N), 0)) steps
(a floor of N (1 - strength); the UNet pipelines' rule, runtime/img2img.py, rounds the other way). Stages whose
steps are all skipped do not run; the photo is resized to the entry stage's size as the pixel relay resizes,
encoded ((posterior mean - shift) * c), and noised to the first kept sigma: z = (1 - sigma) x0 + sigma noise.
The rest of the plan (truncate, relay, re-noise, each stage's shift) runs as without a photo.
"""
from __future__ import annotations

import dataclasses

import torch

from ..core.plan import StagePlan
from .flow_schedule import FlowStageSchedule
from .fused_relay import relay_resize
from .img2img import EntryPoint, ImageInputError

DEFAULT_STRENGTH = 0.8
"""Strength without --strength or --start-stage: the UNet families' default, so that one flag means one thing
(diffusers' flow img2img pipelines default to 0.6)."""


def flow_steps_skipped(total: int, strength: float) -> int:
    """diffusers' flow `get_timesteps`: t_start = int(max(N - min(N * strength, N), 0)), float for float."""
    return int(max(total - min(total * strength, total), 0))


def flow_entry_point(plan: StagePlan, strength: float | None, start_stage: int | None = None) -> EntryPoint:
    """The stage and step the strength selects under the flow rule; `start_stage` (1-based) demands that stage.

    strength None is DEFAULT_STRENGTH without a start stage, and the start stage's first step with one. Raises
    ImageInputError naming the bad value: a strength outside (0, 1], a start stage outside 1..K, or a strength
    whose first step lies outside the start stage (the message gives the stage's range). Any strength in (0, 1]
    runs at least one step under this rule."""
    n_stages, total = len(plan.stages), plan.total_steps
    if start_stage is not None and not 1 <= start_stage <= n_stages:
        raise ImageInputError(f"--start-stage {start_stage}: the plan has stages 1 to {n_stages}")
    ranges = plan.step_ranges()
    if strength is None and start_stage is not None:
        first = ranges[start_stage - 1].start  # counted, not via a float that int() could round down
    else:
        strength = DEFAULT_STRENGTH if strength is None else strength
        if not (isinstance(strength, (int, float)) and 0 < strength <= 1):  # nan fails both comparisons
            raise ImageInputError(f"--strength {strength!r}: must be a number in (0, 1]")
        first = flow_steps_skipped(total, strength)
    k = next(i for i, r in enumerate(ranges) if first in r)
    if start_stage is not None and k != start_stage - 1:
        r = ranges[start_stage - 1]
        lo, hi = (total - r.stop) / total, (total - r.start) / total
        raise ImageInputError(f"--strength {strength:g} starts at step {first + 1} of {total}, in stage {k + 1}, not "
                              f"--start-stage {start_stage}; stage {start_stage} takes strengths above {lo:.4g} "
                              f"up to {hi:.4g}")
    return EntryPoint(k, first - ranges[k].start, first)


def skip_flow_steps(schedule: FlowStageSchedule, steps: int) -> FlowStageSchedule:
    """The stage's schedule without its first `steps` steps (same shift, same sigmas after them)."""
    return dataclasses.replace(schedule, sigma_t=schedule.sigma_t[steps:], sigma_s=schedule.sigma_s[steps:])


def encode_flow_image(nets, image: torch.Tensor, height: int, width: int, scaling: float, shift: float,
                      device) -> torch.Tensor:
    """(mean(E(clamp(bicubic(clamp(image))))) - shift) * c at (height, width): the flow relay's resize and encode.
    The posterior mean, where diffusers samples the posterior of a pixel image (it takes a latent as it is)."""
    return (nets.vae_encode(relay_resize(image.to(device), height, width, nets.vae_dtype)) - shift) * scaling
