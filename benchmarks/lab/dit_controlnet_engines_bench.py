"""SD3 / FLUX with a ControlNet from aoti packages against the torch modules, one GPU (issue #18 item 1).

python benchmarks/lab/dit_controlnet_engines_bench.py --model sd3 --engines ENG --output DIR [--build] [--steps 6,3]

Random weights at the real sizes, and the random ControlNet of dit_controlnet_bench.py (InstantX's shapes). Plan
native x S1 -> 2x native x S2. `--build` first builds the ControlNet and controlled-transformer packages of the
plan into ENG (engine/dit_controlnet_engines.py; the time is reported), else ENG must hold them from an earlier
--build with the same arguments (the ControlNet's fingerprint is its seeded tensors'). Then, in graphs mode on
CUDA (eager on the CPU): the torch path and the packages with the ControlNet, same prompt and seed; writes
dit_controlnet_engines_<model>.json: per-segment medians, totals, per-step times per stage, the packages' latent
against the torch path's, and the graph captures and replays of the packages' run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from dit_controlnet_bench import DTYPES, PROMPT, real_size_controlnet, timed

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.dit_controlnet_engines import build_dit_controlnet_engines, open_dit_controlnet_engines
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.runtime.controlnet import Control
from megafusion.runtime.flow_controlnet import ControlledFlowNetworks
from megafusion.runtime.flow_controlnet_engines import EngineControlledFlowNetworks
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=["sd3", "flux", "tiny-sd3", "tiny-flux"])
    p.add_argument("--engines", required=True, help="engine folder (built into with --build)")
    p.add_argument("--output", required=True)
    p.add_argument("--build", action="store_true", help="build the packages first")
    p.add_argument("--steps", default="6,3", help="steps of the native and the 2x stage (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    s1, s2 = (int(s) for s in args.steps.split(","))
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    bundle = load_model(args.model, random_weights=True, device=dev, dtype=dtype)
    fam = bundle.family
    h, w = fam.native_height, fam.native_width
    plan = validate_plan(fam, [Stage(h, w, s1), Stage(2 * h, 2 * w, s2)])
    net = real_size_controlnet(fam, dev, dtype)
    opts = FlowGenerationOptions(PROMPT, guidance=fam.default_guidance, seed=1)
    batch = 2 if fam.cfg and opts.guidance > 1 else 1
    report = {"model": args.model, "dtype": args.dtype, "plan": plan.describe(), "batch": batch,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "runs": {}}
    if args.build:
        t0 = time.perf_counter()
        report["built"] = build_dit_controlnet_engines(bundle, plan, [net], args.dtype, args.engines, batch, str(dev),
                                                       log=lambda m: print(m, flush=True))
        report["build_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand((1, 3, 8, 8), generator=g), size=(h, w), mode="nearest")
    controls = [Control(net, image.to(dev), scale=0.7)]
    mode = "graphs" if dev.type == "cuda" else "eager"
    t0 = time.perf_counter()
    nets, controlled = open_dit_controlnet_engines(args.engines, bundle, plan, [net], ["(benchmark)"], dev,
                                                   args.dtype, batch)
    report["open_s"] = time.perf_counter() - t0
    latents = {}
    for label in ("torch", "aoti"):
        base = FlowTorchNetworks(bundle)
        cn = (ControlledFlowNetworks(base, controls, dev) if label == "torch"
              else EngineControlledFlowNetworks(base, controls, dev, nets, controlled))
        pipe = FlowMegaFusionPipeline(bundle, cn, dev, mode)
        r = timed(pipe, plan, opts, args.repeats)
        latents[label] = r.pop("latent").float()
        if pipe.graphs is not None:
            r["captures"], r["replays"] = pipe.graphs.captures, pipe.graphs.replays
        r["per_step_ms"] = {name: 1000 * r["segments_s"][name] / st.steps for name, st in
                            ((f"stage {k + 1} ({st.width}x{st.height}, {st.steps} steps)", st)
                             for k, st in enumerate(plan.stages))}
        report["runs"][f"{mode}/{label}"] = r
        print(f"{mode} {label:6} total {r['total_s']:.2f} s  " +
              "  ".join(f"{k} {v:.1f} ms/step" for k, v in r["per_step_ms"].items()), flush=True)
    a, b = latents["aoti"], latents["torch"]
    report["aoti_vs_torch_rel"] = float((a - b).norm() / b.norm())
    print(f"aoti vs torch latent: {report['aoti_vs_torch_rel']:.2e} relative", flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dit_controlnet_engines_{args.model}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
