"""The stage plan (docs/ALGORITHM.md §2): which sizes MegaFusion denoises at, for how many steps each.

Export reads it for shape profiles, the runtime for the stage loop, so it lives in this lowest layer.
Sizes are written width x height on the command line (`1920x1080`); `Stage` stores both by name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .families import ModelFamily

MAX_SIDE = 16384
"""Largest stage or output side accepted (pixels)."""

MIN_STAGE_AREA_FRACTION = 0.75
"""A stage below this fraction of the native pixel count counts as smaller than native."""

MAX_TOTAL_STEPS = 999
"""DDIM over 1000 training steps with steps_offset 1: 1000 steps would ask for timestep 1000."""

MAX_RELAY_FACTOR = 2.0
"""Largest side ratio of one default relay: the paper's largest (SDXL 1024 -> 2048); past it stages are added."""


class PlanError(ValueError):
    """A stage plan or size that the model cannot run; the message names the bad value."""


@dataclass(frozen=True)
class Stage:
    """One resolution of the coarse-to-fine plan."""

    height: int
    """Pixel height denoised at in this stage."""
    width: int
    """Pixel width denoised at in this stage."""
    steps: int
    """How many consecutive timesteps of the global DDIM list this stage takes."""

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def __str__(self) -> str:
        return f"{self.width}x{self.height}:{self.steps}"


@dataclass(frozen=True)
class StagePlan:
    """A validated plan plus the exact output size (the last stage is cropped to it)."""

    stages: tuple[Stage, ...]
    """Stage 1 is at about the model's native pixel count; later stages never shrink a side."""
    output_height: int
    """Height of the returned image; at most the last stage's, within one size multiple."""
    output_width: int
    """Width of the returned image."""

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def gamma(self, k: int) -> float:
        """Noise re-scheduling factor of stage k (0-based): pixel count over stage 1's (docs/ALGORITHM.md §4)."""
        return self.stages[k].pixels / self.stages[0].pixels

    def step_ranges(self) -> list[range]:
        """Which indices of the global timestep list each stage takes."""
        out, start = [], 0
        for s in self.stages:
            out.append(range(start, start + s.steps))
            start += s.steps
        return out

    def describe(self) -> str:
        parts = [f"{s.width}x{s.height} x{s.steps}" for s in self.stages]
        return " -> ".join(parts) + f"  (output {self.output_width}x{self.output_height})"


_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """`'1920x1080'` -> (width, height)."""
    m = _SIZE_RE.match(text or "")
    if not m:
        raise PlanError(f"malformed size {text!r}: expected WIDTHxHEIGHT, e.g. 1920x1080")
    w, h = int(m.group(1)), int(m.group(2))
    for side in (w, h):
        if side <= 0 or side > MAX_SIDE:
            raise PlanError(f"size {text!r}: each side must be between 1 and {MAX_SIDE} pixels")
    return w, h


def parse_stages(text: str) -> list[Stage]:
    """`'1024x1024:40,2048x2048:10'` -> stages (sizes as WIDTHxHEIGHT, then steps)."""
    stages = []
    for part in (text or "").split(","):
        size, sep, steps = part.strip().rpartition(":")
        if not sep:
            raise PlanError(f"malformed stage {part.strip()!r} in --stages: expected WIDTHxHEIGHT:STEPS")
        w, h = parse_size(size)
        try:
            n = int(steps)
        except ValueError:
            raise PlanError(f"malformed step count {steps!r} in stage {part.strip()!r}") from None
        stages.append(Stage(h, w, n))
    return stages


def _round_to(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def _ceil_to(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


def default_plan(family: ModelFamily, width: int | None = None, height: int | None = None,
                 total_steps: int | None = None) -> StagePlan:
    """The paper's plan for `family`, carried to any output size and aspect ratio.

    Stage 1 keeps the output's aspect ratio at about the native pixel count; intermediate stages
    interpolate the side lengths; every side is rounded to the UNet's multiple, and the last stage is
    the output rounded up (then cropped back to exactly the output).
    """
    if width is None or height is None:
        h, w, _ = family.default_stages[-1]
        width, height = (w, h) if width is None and height is None else (width or w, height or h)
    m = family.pixel_multiple
    if width * height < MIN_STAGE_AREA_FRACTION * family.native_pixels:
        raise PlanError(
            f"size {width}x{height} is smaller than {family.name}'s native "
            f"{family.native_width}x{family.native_height}; MegaFusion generates at native size or above"
        )
    hf, wf = _ceil_to(height, m), _ceil_to(width, m)
    h1 = min(hf, _round_to(math.sqrt(family.native_pixels * height / width), m))
    w1 = min(wf, _round_to(math.sqrt(family.native_pixels * width / height), m))
    template = family.default_stages
    n_total = total_steps if total_steps is not None else sum(s for _, _, s in template)
    if (h1, w1) == (hf, wf):
        return validate_plan(family, [Stage(hf, wf, n_total)], width, height)
    k_last = len(template) - 1
    ratio = max(hf / h1, wf / w1)
    if 1 + (ratio - 1) / max(k_last, 1) > MAX_RELAY_FACTOR:  # the template's first relay would pass 2x a side
        return validate_plan(family, _doubling_stages(family, h1, w1, hf, wf, ratio, total_steps), width, height)
    steps = [s for _, _, s in template]
    if total_steps is not None:  # keep the template's proportions
        steps = _split_steps(total_steps, steps)
    stages: list[Stage] = []
    for k in range(len(template)):
        f = k / k_last
        hk = hf if k == k_last else _round_to(h1 + (hf - h1) * f, m)
        wk = wf if k == k_last else _round_to(w1 + (wf - w1) * f, m)
        if stages and (stages[-1].height, stages[-1].width) == (hk, wk):
            stages[-1] = Stage(hk, wk, stages[-1].steps + steps[k])  # merge a stage rounding made empty
        else:
            stages.append(Stage(hk, wk, steps[k]))
    return validate_plan(family, stages, width, height)


def _doubling_stages(family: ModelFamily, h1: int, w1: int, hf: int, wf: int, ratio: float,
                     total_steps: int | None) -> list[Stage]:
    """Past the template's reach (docs/ALGORITHM.md §2, "Large sizes"): K = 1 + ceil(log2 ratio) stages whose
    sides grow by the same factor, at most 2x per relay; stage 1 keeps the template's steps, the later stages
    share the rest evenly (SDXL 4096: 1024 x40 -> 2048 x5 -> 4096 x5)."""
    m, template = family.pixel_multiple, family.default_stages
    k_last = math.ceil(math.log2(ratio) - 1e-9)
    first, rest = template[0][2], sum(s for _, _, s in template[1:])
    steps = [first] + [rest // k_last + (1 if k < rest % k_last else 0) for k in range(k_last)]
    if total_steps is not None:
        steps = _split_steps(total_steps, steps)
    stages: list[Stage] = []
    for k in range(k_last + 1):
        f = k / k_last
        hk = hf if k == k_last else _round_to(h1 * (hf / h1) ** f, m)
        wk = wf if k == k_last else _round_to(w1 * (wf / w1) ** f, m)
        if stages and (stages[-1].height, stages[-1].width) == (hk, wk):
            stages[-1] = Stage(hk, wk, stages[-1].steps + steps[k])
        else:
            stages.append(Stage(hk, wk, steps[k]))
    return stages


def _split_steps(total: int, template: list[int]) -> list[int]:
    if total < len(template):
        raise PlanError(f"{total} steps cannot fill a {len(template)}-stage plan")
    t = sum(template)
    out = [max(1, round(total * s / t)) for s in template[1:]]
    return [total - sum(out)] + out


def validate_plan(family: ModelFamily, stages: list[Stage], width: int | None = None,
                  height: int | None = None) -> StagePlan:
    """Checks a plan against the model and returns it with the output size (default: last stage's)."""
    if not stages:
        raise PlanError("the stage plan is empty")
    m = family.pixel_multiple
    for k, s in enumerate(stages, 1):
        if s.steps <= 0:
            raise PlanError(f"stage {k} ({s}) has {s.steps} steps; each stage needs at least 1")
        for name, side in (("height", s.height), ("width", s.width)):
            if side <= 0 or side > MAX_SIDE or side % m:
                raise PlanError(
                    f"stage {k} ({s}): {name} {side} is not a positive multiple of {m} "
                    f"(what {family.name}'s UNet accepts), at most {MAX_SIDE}"
                )
        if family.max_side is not None and max(s.height, s.width) > family.max_side:
            raise PlanError(f"stage {k} ({s}): a side above {family.max_side}, the largest {family.name} takes")
        if s.pixels < MIN_STAGE_AREA_FRACTION * family.native_pixels:
            raise PlanError(
                f"stage {k} ({s.width}x{s.height}) is smaller than {family.name}'s native "
                f"{family.native_width}x{family.native_height}"
            )
        if k > 1:
            p = stages[k - 2]
            if s.height < p.height or s.width < p.width:
                raise PlanError(
                    f"stage {k} ({s.width}x{s.height}) is smaller than stage {k - 1} "
                    f"({p.width}x{p.height}) on a side; stages go coarse to fine"
                )
    total = sum(s.steps for s in stages)
    if total > MAX_TOTAL_STEPS:
        raise PlanError(f"{total} steps in all; at most {MAX_TOTAL_STEPS}")
    last = stages[-1]
    out_w = last.width if width is None else width
    out_h = last.height if height is None else height
    if not (last.width - m < out_w <= last.width and last.height - m < out_h <= last.height):
        raise PlanError(
            f"output size {out_w}x{out_h} does not fit the last stage {last.width}x{last.height}: "
            f"each side must be at most the stage's and within {m - 1} pixels of it"
        )
    return StagePlan(tuple(stages), out_h, out_w)
