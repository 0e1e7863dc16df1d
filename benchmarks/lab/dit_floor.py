"""The least time a transformer plan can take on a GPU whose kernels peak at given rates, held against a measured run.

Each segment's true FLOPs (benchmarks/dit_flops.py: the transformer's steps, each relay's VAE decode and encode, the
final decode) split into attention matmuls and the rest (GEMMs, convolutions), at the attention and GEMM rates
given: a lower bound on any implementation's time at those rates, compiled or not. Text encoders count 0 s (they
are not counted; their measured time is a few percent). Against a run of benchmarks/lab/dit_speed.py it bounds the
speed-up compiling can give over that run, and says what attention rate a target speed-up would need.

python3 benchmarks/lab/dit_floor.py --speed RESULTS/dit_speed_sd3.json --gemm-tflops 767 --attention-tflops 476 \
    --target 1.7 --output DIR
writes dit_floor_<model>.json and .md, with the commit and command.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from megafusion.benchmarks.timing import provenance


def segment_floor(true_tflop: float, attention_tflop: float, gemm_rate: float, attention_rate: float) -> float:
    """Seconds for one segment at the two rates (TFLOP/s)."""
    return attention_tflop / attention_rate + (true_tflop - attention_tflop) / gemm_rate


def attention_rate_for(seconds: float, rest_s: float, attention_tflop: float) -> float | None:
    """The attention rate (TFLOP/s) at which the plan takes `seconds`, everything else taking `rest_s`; None when
    the rest alone takes that long."""
    left = seconds - rest_s
    return attention_tflop / left if left > 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/dit_floor.py", description=__doc__.splitlines()[0])
    p.add_argument("--speed", required=True, help="a dit_speed.py JSON (its model, plan and measured segments)")
    p.add_argument("--mode", default="eager", help="which of its modes is the baseline (default eager)")
    p.add_argument("--gemm-tflops", type=float, required=True, help="measured dense GEMM rate of the GPU, TFLOP/s")
    p.add_argument("--attention-tflops", type=float, required=True,
                   help="measured attention kernel rate at the plan's largest shape, TFLOP/s")
    p.add_argument("--target", type=float, default=1.7, help="speed-up over the baseline to test (default 1.7)")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    for name in ("gemm_tflops", "attention_tflops", "target"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be positive")
    path = Path(a.speed)
    if not path.is_file():
        p.error(f"--speed {a.speed}: no such file")
    run = json.loads(path.read_text())
    if a.mode not in run.get("modes", {}):
        p.error(f"--mode {a.mode}: {path} has modes {', '.join(run.get('modes', {})) or 'none'}")
    measured = run["modes"][a.mode]["megafusion"]

    from megafusion.benchmarks.dit_flops import DiTCostCounter, dit_plan_cost
    from megafusion.core.families import get_family
    from megafusion.core.plan import default_plan

    fam = get_family(run["model"])
    cost = dit_plan_cost(DiTCostCounter(fam), default_plan(fam))  # CFG where the family has it (SD3)
    if cost.plan != measured["plan"]:
        p.error(f"{path}: its plan {measured['plan']!r} is not {fam.name}'s default plan {cost.plan!r}")
    rows, floor_s, rest_s, attention = [], 0.0, 0.0, 0.0
    for seg in cost.segments:
        took = measured["segments_s"].get(seg.name)
        s = segment_floor(seg.true_tflop, seg.attention_tflop, a.gemm_tflops, a.attention_tflops)
        floor_s += s
        rest_s += (seg.true_tflop - seg.attention_tflop) / a.gemm_tflops
        attention += seg.attention_tflop
        rows.append({"segment": seg.name, "true_tflop": seg.true_tflop, "attention_tflop": seg.attention_tflop,
                     "measured_s": took, "floor_s": s,
                     "measured_tflop_per_s": seg.true_tflop / took if took and seg.true_tflop else None})
    total = measured["total_s"]
    need = total / a.target
    res = {"model": fam.name, "plan": cost.plan, "baseline": f"{a.mode}, {run['device']}, {run['dtype']}",
           "gemm_tflops": a.gemm_tflops, "attention_tflops": a.attention_tflops, "measured_s": total,
           "floor_s": floor_s, "max_speedup": total / floor_s, "target": a.target, "target_s": need,
           "attention_tflops_for_target": attention_rate_for(need, rest_s, attention), "segments": rows,
           "provenance": provenance()}
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dit_floor_{fam.name}.json").write_text(json.dumps(res, indent=1))
    md = [f"# {fam.name}: the least time of {cost.plan} at GEMMs {a.gemm_tflops:g} and attention "
          f"{a.attention_tflops:g} TFLOP/s",
          "", f"Baseline: {res['baseline']} ({path}).", "",
          "| segment | true TFLOP | of it attention | measured s | achieved TFLOP/s | floor s |",
          "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        took = "–" if r["measured_s"] is None else f"{r['measured_s']:.3f}"
        rate = "–" if r["measured_tflop_per_s"] is None else f"{r['measured_tflop_per_s']:.0f}"
        md.append(f"| {r['segment']} | {r['true_tflop']:.1f} | {r['attention_tflop']:.1f} | {took} | {rate} | "
                  f"{r['floor_s']:.3f} |")
    want = res["attention_tflops_for_target"]
    md += ["", f"Measured {total:.3f} s; floor {floor_s:.3f} s: at most {res['max_speedup']:.2f}x faster than the "
               f"baseline at these rates.",
           f"{a.target:g}x means {need:.3f} s: " + (f"attention at {want:.0f} TFLOP/s with everything else at the "
                                                      f"GEMM rate." if want else
                                                      "more than everything but attention takes at the GEMM rate.")]
    (out / f"dit_floor_{fam.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
