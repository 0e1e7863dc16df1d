"""What FP8 projections can give a UNet plan, counted: the least time of each segment at given GEMM, FP8 GEMM and
attention rates, in fp16 and with the FP8 policy's layers (engine/fp8.py) at the FP8 rate, held against a measured
mf-bench variant; the FP8 time that variant's own efficiency (floor / measured, per segment) would give; and the
plan's time with the FP8 layers free, which no FP8 kernel can beat.

python3 benchmarks/lab/fp8_floor.py --results RESULTS/results.json --variant "engine: compiled" --gemm-tflops 768 \
    --fp8-tflops 1443 --attention-tflops 476 --target 2.5 --output DIR
writes fp8_floor_<model>.json and .md, with the commit and command. Counts on the meta device (no weights, no GPU).
The projection is an estimate, not a measurement: it assumes FP8 layers run as efficiently as the fp16 ones did.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from megafusion.benchmarks.timing import provenance


def fp8_tflop_per_step(family, height: int, width: int, batch: int = 2) -> float:
    """TFLOP of one UNet step in the layers the default `Fp8Policy` quantizes (after QKV fusion, as it runs)."""
    from diffusers import UNet2DConditionModel

    from megafusion.engine.fp8 import Fp8Policy, layer_role

    roles = Fp8Policy().roles
    with torch.device("meta"):
        unet = UNet2DConditionModel(**family.unet)
    unet.fuse_qkv_projections()
    macs = [0]

    def hook(name):
        def count(m, _, out):
            if layer_role(name) not in roles:
                return
            if isinstance(m, nn.Linear):
                macs[0] += out.numel() * m.in_features
            elif m.kernel_size == (1, 1):
                macs[0] += out.numel() * m.in_channels // m.groups
        return count

    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_hook(hook(name))
    vs, d = family.vae_scale, int(family.unet["cross_attention_dim"])
    with torch.device("meta"), torch.no_grad():
        added = None
        if family.is_xl:
            pooled = family.text_encoders[-1].projection_dim
            added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
        unet(torch.empty(batch, 4, height // vs, width // vs), torch.tensor(500.0), torch.empty(batch, 77, d),
             added_cond_kwargs=added)
    return 2 * macs[0] / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/fp8_floor.py", description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="an mf-bench results.json")
    p.add_argument("--variant", default="engine: compiled", help="its variant to hold the floors against")
    for name, what in (("gemm", "dense fp16 GEMM"), ("fp8", "FP8 GEMM"), ("attention", "attention kernel")):
        p.add_argument(f"--{name}-tflops", type=float, required=True, help=f"measured {what} rate, TFLOP/s")
    p.add_argument("--target", type=float, help="a plan time (s) to compare the projection with")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    rates = {"gemm": a.gemm_tflops, "fp8": a.fp8_tflops, "attention": a.attention_tflops}
    bad = [k for k, v in rates.items() if v <= 0]
    if bad:
        p.error(f"--{bad[0]}-tflops {rates[bad[0]]}: must be positive")
    path = Path(a.results)
    if not path.is_file():
        p.error(f"--results {a.results}: no such file")
    run = json.loads(path.read_text())
    names = [v["name"] for v in run.get("variants", [])]
    if a.variant not in names:
        p.error(f"--variant {a.variant!r}: {path} has {', '.join(names) or 'no variants'}")
    variant = next(v for v in run["variants"] if v["name"] == a.variant)

    from megafusion.core.families import get_family
    from megafusion.core.plan import Stage

    fam = get_family(run["model"])
    plan_stages = list(_stages(variant["plan"]))
    rows, measured, fp16_floor, fp8_floor, projected, free = [], 0.0, 0.0, 0.0, 0.0, 0.0
    k = 0
    for seg in variant["segments"]:
        t, att, took = seg["true_tflop"], seg["attention_tflop"], seg["median_s"]
        fp8 = 0.0
        if seg["kind"] == "stage":
            st: Stage = plan_stages[k]
            k += 1
            fp8 = fp8_tflop_per_step(fam, st.height, st.width) * st.steps
        f16 = att / rates["attention"] + (t - att) / rates["gemm"]
        f8 = att / rates["attention"] + (t - att - fp8) / rates["gemm"] + fp8 / rates["fp8"]
        eff = f16 / took if took else None
        proj = f8 / eff if eff else took
        # No FP8 kernel can beat the FP8 layers taking no time: the bound on what FP8 projections can give.
        zero = (f16 - fp8 / rates["gemm"]) / eff if eff else took
        free += zero
        measured += took
        fp16_floor += f16
        fp8_floor += f8
        projected += proj
        rows.append({"segment": seg["name"], "true_tflop": t, "attention_tflop": att, "fp8_tflop": fp8,
                     "measured_s": took, "floor_fp16_s": f16, "floor_fp8_s": f8, "efficiency": eff,
                     "projected_fp8_s": proj, "fp8_layers_free_s": zero})
    res = {"model": fam.name, "plan": variant["plan"], "variant": a.variant, "results": str(path), "rates": rates,
           "measured_s": measured, "floor_fp16_s": fp16_floor, "floor_fp8_s": fp8_floor,
           "projected_fp8_s": projected, "fp8_layers_free_s": free, "target_s": a.target, "segments": rows,
           "provenance": provenance()}
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fp8_floor_{fam.name}.json").write_text(json.dumps(res, indent=1))
    md = [f"# {fam.name}, {variant['plan']}: floors in fp16 and with FP8 projections",
          "", f"Rates (TFLOP/s): GEMM {a.gemm_tflops:g}, FP8 GEMM {a.fp8_tflops:g}, attention "
              f"{a.attention_tflops:g}. Measured: {a.variant!r} in {path}.", "",
          "| segment | true TFLOP | attention | FP8 layers | measured s | floor fp16 s | efficiency | floor FP8 s "
          "| projected FP8 s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        eff = "–" if r["efficiency"] is None else f"{r['efficiency']:.0%}"
        md.append(f"| {r['segment']} | {r['true_tflop']:.1f} | {r['attention_tflop']:.1f} | {r['fp8_tflop']:.1f} | "
                  f"{r['measured_s']:.3f} | {r['floor_fp16_s']:.3f} | {eff} | {r['floor_fp8_s']:.3f} | "
                  f"{r['projected_fp8_s']:.3f} |")
    md += ["", f"Measured {measured:.3f} s (segments summed); floors {fp16_floor:.3f} s in fp16, {fp8_floor:.3f} s "
               f"with FP8; at the measured efficiency per segment, FP8 would take about {projected:.3f} s"
               + (f" (target {a.target:g} s)." if a.target else "."),
           "", f"With the FP8 layers taking no time at all (the rest at its measured efficiency): {free:.3f} s, the "
               "bound on what FP8 projections can give this plan."]
    (out / f"fp8_floor_{fam.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _stages(plan: str):
    """The stages of a plan as `StagePlan.describe` writes it ('1024x1024 x40 -> 2048x2048 x10  (output ...)')."""
    from megafusion.core.plan import Stage

    for part in plan.split("(")[0].split("->"):
        size, steps = part.split()
        w, h = size.split("x")
        yield Stage(int(h), int(w), int(steps.lstrip("x")))


if __name__ == "__main__":
    raise SystemExit(main())
