"""Writes the shared test vectors that the C++ core (cpp/) is checked against by ctest.

    python -m megafusion.runtime.test_vectors --output DIR     # writes DIR/test_vectors.json

The Python modules are the reference: stage plans (core/plan.py, including refusals and their messages),
per-stage schedules with noise re-scheduling (runtime/schedule.py) and the clamp/bicubic/clamp of the pixel
relay (runtime/relay.py, i.e. torch's bicubic). Floats are written with Python's repr, which round-trips
exactly through C++'s strtod.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..core.families import FAMILIES, ModelFamily
from ..core.plan import PlanError, Stage, default_plan, parse_stages, validate_plan
from .relay import resize_clamped
from .schedule import plan_schedule

# Output sizes per native size: the paper's, odd aspect ratios, native, below native (refused), too large.
_SIZES = {
    1024: [None, (2048, 2048), (1920, 1080), (2048, 1536), (640, 2560), (1024, 1024), (1000, 1000), (1100, 900),
           (3000, 1000), (800, 800), (20000, 1024)],
    512: [None, (1024, 1024), (1920, 1080), (2048, 1536), (640, 2560), (512, 512), (500, 700), (768, 768),
          (400, 400), (20000, 512)],
    128: [None, (256, 256), (240, 135), (480, 270), (160, 640), (128, 128), (129, 129), (192, 128), (100, 100)],
}
_TOTAL_STEPS = [None, 30, 7, 2, 1001]
"""Step totals tried with the default size (2 cannot fill a three-stage plan; 1001 exceeds 1000)."""

_RESIZES = [((1, 3, 4, 4), (8, 8)), ((1, 3, 8, 8), (12, 12)), ((1, 2, 6, 10), (9, 15)), ((1, 3, 10, 7), (5, 4)),
            ((1, 3, 5, 5), (5, 5)), ((2, 1, 7, 3), (16, 11)), ((1, 4, 16, 16), (32, 24))]
"""(input NCHW, output HW) for the bicubic cases: up, 1.5x, non-integer, down, identity, batch, mixed."""


def family_json(f: ModelFamily) -> dict[str, Any]:
    return {"name": f.name, "native_height": f.native_height, "native_width": f.native_width,
            "pixel_multiple": f.pixel_multiple, "vae_scale": f.vae_scale,
            "default_stages": [list(s) for s in f.default_stages], "scheduler": f.scheduler}


def _stages(plan_stages) -> list[list[int]]:
    return [[s.height, s.width, s.steps] for s in plan_stages]


def plan_cases(f: ModelFamily) -> list[dict[str, Any]]:
    out = []
    calls = [(size, None) for size in _SIZES[f.native_height]] + [(None, n) for n in _TOTAL_STEPS[1:]]
    for size, steps in calls:
        case: dict[str, Any] = {"family": f.name, "width": size and size[0], "height": size and size[1],
                                "total_steps": steps}
        try:
            p = default_plan(f, case["width"], case["height"], steps)
            case.update(stages=_stages(p.stages), output=[p.output_height, p.output_width])
        except PlanError as e:
            case["error"] = str(e)
        out.append(case)
    return out


def validate_cases(f: ModelFamily) -> list[dict[str, Any]]:
    n, m = f.native_height, f.pixel_multiple
    two = [(n, n, 10), (2 * n, 2 * n, 3)]
    # (stages as (height, width, steps), output (height, width) or None): each refusal, then valid plans.
    plans = [
        ([], None), ([(n, n, 0)], None), ([(n + m // 2, n, 5)], None), ([(n // 2, n // 2, 5)], None),
        ([(2 * n, 2 * n, 5), (n, 2 * n, 5)], None), ([(n, n, 600), (2 * n, 2 * n, 401)], None),
        (two, (2 * n - m, 2 * n)), (two, (2 * n - 1, 2 * n - 1)), (two, (2 * n + 1, 2 * n)),
        ([(n, n, 40), (n + m, 2 * n, 5), (2 * n, 2 * n, 5)], None), ([(n, n, 10), (20000, 20000, 3)], None),
    ]
    out = []
    for stages, size in plans:
        case: dict[str, Any] = {"family": f.name, "stages": [list(s) for s in stages],
                                "width": size and size[1], "height": size and size[0]}
        try:
            p = validate_plan(f, [Stage(*s) for s in stages], case["width"], case["height"])
            case["output"] = [p.output_height, p.output_width]
        except PlanError as e:
            case["error"] = str(e)
        out.append(case)
    return out


def schedule_cases(f: ModelFamily) -> list[dict[str, Any]]:
    out = []
    n = f.native_height
    for size, steps in ((None, None), ((2 * n + n // 2, 2 * n), 17), ((n, n), 50), (None, 999)):
        plan = default_plan(f, size and size[0], size and size[1], steps)
        for resched in (True, False):
            per = [{"gamma": s.gamma, "timesteps": s.timesteps.tolist(), "abar_t": s.abar_t.tolist(),
                    "abar_s": s.abar_s.tolist()} for s in plan_schedule(plan, f.scheduler, resched)]
            out.append({"family": f.name, "stages": _stages(plan.stages), "reschedule": resched, "per_stage": per})
    return out


_STAGE_TEXTS = ["1024x1024:40,2048x2048:10", " 640X2560 : 3 ,1280x5120:2", "1024x1024", "axb:3", "0x10:2",
                "1024x1024:abc", "20000x10:1", "128x128:-1", "1920x1080:5,", "12x"]
"""`--stages` texts: valid ones and each refusal of parse_stages/parse_size."""


def parse_cases() -> list[dict[str, Any]]:
    out = []
    for text in _STAGE_TEXTS:
        try:
            out.append({"text": text, "stages": _stages(parse_stages(text))})
        except PlanError as e:
            out.append({"text": text, "error": str(e)})
    return out


def bicubic_cases(seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, (oh, ow) in _RESIZES:
        x = torch.randn(shape, generator=g) * 1.5  # about a third of the values lie outside [-1, 1]
        y = resize_clamped(x, oh, ow)
        out.append({"shape": list(shape), "out": [oh, ow], "input": x.flatten().tolist(),
                    "output": y.flatten().tolist()})
    return out


def vectors() -> dict[str, Any]:
    fams = [f for f in FAMILIES.values() if f.kind in ("sd15", "sdxl")]  # the C++ core takes the UNet families
    return {
        "format": 1,
        "families": [family_json(f) for f in fams],
        "plans": [c for f in fams for c in plan_cases(f)],
        "validate": [c for f in fams for c in validate_cases(f)],
        "parse": parse_cases(),
        "schedules": [c for f in fams for c in schedule_cases(f)],
        "bicubic": bicubic_cases(),
    }


def write_vectors(argv: list[str] | None, prog: str, what: str, filename: str, build) -> int:
    """The vector writers' command line: `--output DIR` gets `filename` holding `build()` as JSON."""
    p = argparse.ArgumentParser(prog=prog, description=f"Write the JSON test vectors that ctest checks {what} against.")
    p.add_argument("--output", required=True, help=f"folder to write {filename} into (created if missing)")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(json.dumps(build()))
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return write_vectors(argv, "python -m megafusion.runtime.test_vectors", "the C++ core", "test_vectors.json",
                         vectors)


if __name__ == "__main__":
    sys.exit(main())
