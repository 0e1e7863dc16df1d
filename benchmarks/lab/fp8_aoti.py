"""Can an FP8 UNet be an AOTInductor package? The probe before FP8 engines (`mf-build-engines --precision fp8`).

python3 benchmarks/lab/fp8_aoti.py --model tiny-sd15 --device cpu --output DIR
python3 benchmarks/lab/fp8_aoti.py --model sdxl --device cuda --output DIR      # on the GPU: bf16 + FP8

The UNet's policy layers are swapped for FP8 ones (engine/fp8.py), then exported the way export/aoti_export.py
exports engines (`torch.export` with the plan's range of sides dynamic, `aoti_compile_and_package`), loaded
back, and run at each stage shape of the default plan: its eps against the eager FP8 module's (same arithmetic)
and the float UNet's. Writes fp8-aoti-<model>.json; export and compile time, package size.
The module runs in fp32 on the CPU (whose `_scaled_mm` writes fp32) and in bf16 on CUDA (row-wise: bf16 only).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from megafusion.benchmarks.timing import provenance
from megafusion.core.dilation import mid_dilation
from megafusion.core.loading import load_model
from megafusion.core.plan import default_plan
from megafusion.core.specs import range_profile, unet_spec
from megafusion.core.wrappers import wrap
from megafusion.engine.fp8 import fp8_unavailable, quantize_unet
from megafusion.export.aoti_export import dynamic_shapes


def relerr(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(args) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cuda" and fp8_unavailable(dev):
        raise SystemExit(f"fp8_aoti.py: {fp8_unavailable(dev)}")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bundle = load_model(args.model, random_weights=True, device=dev, dtype=dtype)
    fam, plan = bundle.family, default_plan(bundle.family)
    ref_unet = bundle.unet
    unet = copy.deepcopy(ref_unet)
    layers = quantize_unet(unet)
    spec = unet_spec(fam, "fp32", args.dilation)  # names and axes; the float inputs are cast to `dtype` below
    profile = range_profile(fam, spec, plan)
    lat = profile.shapes[0][2]
    axes = spec.axes(spec.batch_range[2], lat[2], lat[3], fam.vae_scale)

    def inputs(ax):
        return tuple(x.to(dev, dtype if x.dtype == torch.float32 and t.name not in ("timestep", "time_ids")
                          else x.dtype) for x, t in zip(spec.sample_inputs(ax), spec.inputs))

    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "model": args.model, "dtype": str(dtype), "fp8_layers": len(layers),
              "dilation": args.dilation, "plan": plan.describe()}
    wrapper, ref_wrapper = wrap(unet, spec, fam.is_xl).eval(), wrap(ref_unet, spec, fam.is_xl).eval()
    ds = dynamic_shapes(fam, spec, profile)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings(), mid_dilation(unet, args.dilation):
            warnings.simplefilter("ignore")
            ep = torch.export.export(wrapper, inputs(axes), dynamic_shapes=tuple(ds[t.name] for t in spec.inputs),
                                     strict=False)
        report["export_s"] = time.perf_counter() - t0
        report["scaled_mm_nodes"] = sum("_scaled_mm" in str(n.target) for n in ep.graph.nodes)
        pkg = Path(tempfile.mkdtemp(dir=out)) / "unet-fp8.pt2"
        t1 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(ep, package_path=str(pkg))
        report["compile_s"] = time.perf_counter() - t1
        report["package_mib"] = pkg.stat().st_size / 2 ** 20
        model = torch._inductor.aoti_load_package(str(pkg))
    except Exception as e:  # noqa: BLE001 - the probe's answer is the failure itself
        report["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(f"failed: {report['error'][:500]}", flush=True)
        (out / f"fp8-aoti-{args.model}.json").write_text(json.dumps(provenance() | report, indent=1))
        return report
    report["shapes"] = []
    for st in plan.stages:
        ax = spec.axes(2, st.height // fam.vae_scale, st.width // fam.vae_scale, fam.vae_scale)
        x = inputs(ax)
        with torch.no_grad(), mid_dilation(unet, args.dilation), mid_dilation(ref_unet, args.dilation):
            got, eager, ref = model(*x), wrapper(*x), ref_wrapper(*x)
        row = {"size": f"{st.width}x{st.height}", "aoti_vs_eager_fp8": relerr(got, eager),
               "aoti_vs_float": relerr(got, ref), "eager_fp8_vs_float": relerr(eager, ref)}
        report["shapes"].append(row)
        print(row, flush=True)
    print(f"export {report['export_s']:.1f} s, AOTInductor compile {report['compile_s']:.1f} s, package "
          f"{report['package_mib']:.1f} MiB, {report['scaled_mm_nodes']} _scaled_mm nodes", flush=True)
    (out / f"fp8-aoti-{args.model}.json").write_text(json.dumps(provenance() | report, indent=1))
    pkg.unlink()
    pkg.parent.rmdir()
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/fp8_aoti.py")
    p.add_argument("--model", default="tiny-sd15")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dilation", type=int, default=1, help="mid-block dilation baked in (default: %(default)s)")
    p.add_argument("--output", required=True)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
