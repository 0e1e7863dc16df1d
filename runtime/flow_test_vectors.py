"""Writes the test vectors that ctest checks the C++ flow schedule and transformer-family table against
(cpp/tests/test_flow_vectors.cpp), as runtime/test_vectors.py does for the UNet families.

    python -m megafusion.runtime.flow_test_vectors --output DIR     # writes DIR/flow_test_vectors.json

runtime/flow_schedule.py is the reference: per-stage sigmas with SD3's shift and FLUX's dynamic shift, with and
without re-scheduling, on default and custom plans. Floats are written with Python's repr (exact through strtod).
"""
from __future__ import annotations

from typing import Any

from ..core.dit_families import DIT_FAMILIES, DiTFamily
from ..core.plan import Stage, default_plan, validate_plan
from .flow_schedule import base_sigmas, plan_flow_schedule
from .test_vectors import plan_cases, validate_cases, write_vectors


def flow_family_json(f: DiTFamily) -> dict[str, Any]:
    return {"name": f.name, "kind": f.kind, "native_height": f.native_height, "native_width": f.native_width,
            "pixel_multiple": f.pixel_multiple, "vae_scale": f.vae_scale, "patch": f.patch,
            "latent_channels": f.latent_channels, "max_side": f.max_side or 0, "t5_max_length": f.t5_max_length,
            "default_guidance": f.default_guidance, "default_stages": [list(s) for s in f.default_stages],
            "guidance_embeds": bool(f.transformer.get("guidance_embeds", False)),
            "rope_axes": list(f.transformer.get("axes_dims_rope", [])) if f.kind == "flux" else [],
            "scheduler": f.scheduler}


def _plans(f: DiTFamily) -> list:
    n, m = f.native_height, f.pixel_multiple
    return [default_plan(f), default_plan(f, 2 * n + 2 * m, 2 * n, 17),
            validate_plan(f, [Stage(n, n, 2), Stage(n + 2 * m, n + 4 * m, 2)]),  # Stage(height, width, steps)
            validate_plan(f, [Stage(n, n, 1)]), validate_plan(f, [Stage(n, n, 3), Stage(n, n, 1), Stage(2 * n, 3 * n, 4)])]


def flow_schedule_cases(f: DiTFamily) -> list[dict[str, Any]]:
    out = []
    for plan in _plans(f):
        for resched in (True, False):
            per = [{"shift": s.shift, "sigma_t": s.sigma_t.tolist(), "sigma_s": s.sigma_s.tolist()}
                   for s in plan_flow_schedule(plan, f, resched)]
            out.append({"family": f.name, "stages": [[s.height, s.width, s.steps] for s in plan.stages],
                        "reschedule": resched, "per_stage": per})
    return out


def flow_vectors() -> dict[str, Any]:
    fams = list(DIT_FAMILIES.values())
    return {"format": 1, "families": [flow_family_json(f) for f in fams],
            "base_sigmas": [{"family": f.name, "n": n, "sigmas": base_sigmas(n, f).tolist()}
                            for f in fams for n in (1, 2, 28, 50)],
            "schedules": [c for f in fams for c in flow_schedule_cases(f)],
            # runtime/test_vectors.py's plan cases on these families (their sizes by native size), plus SD3's largest side
            "plans": [c for f in fams for c in plan_cases(f)],
            "validate": [c for f in fams for c in validate_cases(f) + side_cases(f)]}


def side_cases(f: DiTFamily) -> list[dict[str, Any]]:
    """A stage at the largest side SD3 takes and one a step beyond (FLUX: no limit, both pass)."""
    from ..core.plan import PlanError

    n, m = f.native_height, f.pixel_multiple
    top = f.max_side or 4 * n
    out = []
    for side in (top, top + m):
        case: dict[str, Any] = {"family": f.name, "stages": [[n, n, 2], [side, n, 2]], "width": None, "height": None}
        try:
            p = validate_plan(f, [Stage(n, n, 2), Stage(side, n, 2)])
            case["output"] = [p.output_height, p.output_width]
        except PlanError as e:
            case["error"] = str(e)
        out.append(case)
    return out


def main(argv: list[str] | None = None) -> int:
    return write_vectors(argv, "python -m megafusion.runtime.flow_test_vectors", "the C++ flow schedule",
                         "flow_test_vectors.json", flow_vectors)


if __name__ == "__main__":
    raise SystemExit(main())
