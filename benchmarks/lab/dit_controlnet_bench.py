"""What a ControlNet costs SD3 / FLUX through the relay, eager against graphs, one GPU (issue #18).

python benchmarks/lab/dit_controlnet_bench.py --model sd3 --output DIR [--steps 6,3] [--repeats 2]

Random weights at the real sizes (nothing is downloaded): the family's transformer, and a ControlNet of the
published shapes built from its config (SD3: 6 joint blocks as InstantX's SD3 ControlNets; FLUX: 5 double and
10 single blocks as InstantX's FLUX.1-dev ControlNets), its zero-initialized layers given random values. Plan:
1024x1024 x S1 -> 2048x2048 x S2 (a short version of the default plan: the per-step times are what matters).
For each mode (eager, graphs) runs the plan without and with the ControlNet, same prompt and seed, and writes
dit_controlnet_<model>.json: per-segment medians, totals, the ControlNet's per-step overhead per stage and the
largest latent difference between graphs and eager (graphs should equal eager up to cuBLAS's choice of kernels).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.runtime.controlnet import Control
from megafusion.runtime.flow_controlnet import ControlledFlowNetworks
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

PROMPT = "a lighthouse on a rocky coast at dawn, highly detailed"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def real_size_controlnet(family, device, dtype, seed: int = 0) -> torch.nn.Module:
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    torch.manual_seed(seed)
    with torch.device(device):  # initialized where it runs: FLUX's is about 3B parameters
        net = _build(family, SD3ControlNetModel, FluxControlNetModel)
    zeros = ("controlnet_blocks", "pos_embed_input", "controlnet_single_blocks", "controlnet_x_embedder")
    net = net.to(dtype=dtype).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(zeros):
                p.normal_(0, 0.02)
    return net


def _build(family, sd3_cls, flux_cls):
    if family.kind == "sd3":
        return sd3_cls(**{**family.transformer, "num_layers": min(6, family.transformer["num_layers"])})
    t = family.transformer  # the tiny model has fewer blocks than a real ControlNet
    return flux_cls(**{**t, "num_layers": min(5, t["num_layers"]), "num_single_layers": min(10, t["num_single_layers"])})


def timed(pipe, plan, opts, repeats: int) -> dict:
    pipe.generate(plan, opts)  # warm-up (and the graphs' capture)
    runs = [pipe.generate(plan, opts) for _ in range(repeats)]
    segs = {name: statistics.median(dict(r.timings)[name] for r in runs) for name, _ in runs[0].timings}
    return {"segments_s": segs, "total_s": statistics.median(sum(s for _, s in r.timings) for r in runs),
            "peak_gib": runs[-1].peak_memory_bytes / 2**30 if runs[-1].peak_memory_bytes else None, "latent": runs[-1].latent}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=["sd3", "flux", "tiny-sd3", "tiny-flux"])
    p.add_argument("--output", required=True)
    p.add_argument("--steps", default="6,3", help="steps of the 1024 and the 2048 stage (default %(default)s)")
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
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand((1, 3, 8, 8), generator=g), size=(h, w), mode="nearest")
    control = Control(net, image.to(dev), scale=0.7)
    opts = FlowGenerationOptions(PROMPT, guidance=fam.default_guidance, seed=1)
    report = {"model": args.model, "dtype": args.dtype, "plan": plan.describe(),
              "controlnet_params_m": sum(t.numel() for t in net.parameters()) / 1e6,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "modes": {}}
    latents = {}
    for mode in ("eager", "graphs") if dev.type == "cuda" else ("eager",):
        for label, controls in (("plain", []), ("controlnet", [control])):
            nets = FlowTorchNetworks(bundle)
            if controls:
                nets = ControlledFlowNetworks(nets, controls, dev)
            r = timed(FlowMegaFusionPipeline(bundle, nets, dev, mode), plan, opts, args.repeats)
            latents[(mode, label)] = r.pop("latent")
            report["modes"][f"{mode}/{label}"] = r
            print(f"{mode:7} {label:10} total {r['total_s']:.2f} s  " +
                  "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["segments_s"].items()), flush=True)
        per_step = {}
        for k, stage in enumerate(plan.stages):
            name = f"stage {k + 1} ({stage.width}x{stage.height}, {stage.steps} steps)"
            a = report["modes"][f"{mode}/plain"]["segments_s"][name]
            b = report["modes"][f"{mode}/controlnet"]["segments_s"][name]
            per_step[name] = {"plain_ms": 1000 * a / stage.steps, "controlnet_ms": 1000 * b / stage.steps,
                              "overhead": b / a - 1}
        report["modes"][f"{mode}/per_step"] = per_step
        print(json.dumps(per_step, indent=1), flush=True)
    if ("graphs", "controlnet") in latents:
        a, b = latents[("graphs", "controlnet")].float(), latents[("eager", "controlnet")].float()
        report["graphs_vs_eager_rel"] = float((a - b).norm() / b.norm())
        print(f"graphs vs eager (controlnet): {report['graphs_vs_eager_rel']:.2e} relative", flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dit_controlnet_{args.model}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
