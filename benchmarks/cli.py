"""`mf-bench`: direct, the eager diffusers-style baseline and the engine, timed in one process, with costs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megafusion.export.cli_common import UsageError, run_main

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mf-bench",
        description="Time MegaFusion against direct generation and an eager diffusers baseline; count its cost.",
    )
    p.add_argument("--model", default="sdxl", help="sd15, sdxl, tiny-sd15 or tiny-sdxl (default sdxl)")
    p.add_argument("--model-path", help="a local diffusers folder")
    p.add_argument("--random-weights", action="store_true", help="the real architecture with random weights")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle checkpoints without safetensors")
    p.add_argument("--size", help="output WIDTHxHEIGHT (default: the paper's plan, 2x native per side)")
    p.add_argument("--stages", help="explicit plan, e.g. 1024x1024:40,2048x2048:10 (WIDTHxHEIGHT:STEPS)")
    p.add_argument("--steps", type=int, help="total steps of the default plan (default 50)")
    p.add_argument("--output", required=True, help="folder for results.json, report.md and chart.png")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--vae-dtype", choices=sorted(DTYPES),
                   help="VAE precision (default: fp32 where the VAE overflows in fp16, else --dtype)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dilation", type=int, default=2, help="mid-block dilation at stages after the first")
    p.add_argument("--no-reschedule", action="store_true", help="no noise re-scheduling")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s to compare with (default: measured on GPU)")
    p.add_argument("--no-peak", action="store_true", help="do not measure the 8192^3 fp16 matmul peak")
    p.add_argument("--cost-only", action="store_true", help="count costs only: build nothing, time nothing")
    p.add_argument("--engines", help="engine variants to time, comma-separated: torch, graphs, compiled "
                                     "(default: all three on CUDA, torch on CPU)")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from megafusion.export.cli_common import default_vae_dtype, plan_from_args, resolve_device
    from megafusion.export.models import SD15, SDXL, get_family

    from .bench import BenchResult, cost_variants, notes, resolve_peak, run_variants, speedups
    from .flops import MetaCostCounter
    from .paper import table1_rows
    from .report import summary_table, write_reports
    from .timing import environment

    family = get_family(args.model)
    plan = plan_from_args(family, args.size, args.stages, args.steps)
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0")
    if args.dilation < 1:
        raise UsageError(f"--dilation {args.dilation}: must be at least 1")
    out_dir = Path(args.output)
    device = resolve_device("cpu" if args.cost_only else args.device)
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")])
    print(f"plan: {plan.describe()}")
    counter = MetaCostCounter(family)
    vae_dtype = None
    if args.cost_only:
        peak, source = (args.peak_tflops, "given on the command line") if args.peak_tflops else (None, None)
        variants = cost_variants(family, plan)
    else:
        from megafusion.export.loading import load_model
        from megafusion.runtime.pipeline import GenerationOptions

        from .variants import default_variants

        bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle, device, dtype)
        vae_dtype = (getattr(torch, DTYPES[args.vae_dtype]) if args.vae_dtype
                     else default_vae_dtype(family, bundle.vae.config, dtype))
        if bundle.vae.dtype != vae_dtype:  # every variant shares the modules, so the same VAE precision
            bundle.vae.to(dtype=vae_dtype)
        print(f"model {family.name} ({bundle.source}) on {device}, UNet {dtype}, VAE {vae_dtype}")
        peak, source = resolve_peak(device, args.peak_tflops, not args.no_peak)
        opts = GenerationOptions(args.prompt, args.negative_prompt, args.guidance, args.seed,
                                 not args.no_reschedule, args.dilation)
        try:
            engines = args.engines or ("torch,graphs,compiled" if device.type == "cuda" else "torch")
            variants = default_variants(bundle, plan, opts, device, tuple(engines.split(",")))
        except ValueError as e:
            raise UsageError(str(e)) from None
    results = run_variants(variants, family, device, args.repeats, args.warmup, peak, counter,
                           cfg=args.guidance > 1.0, dilation=args.dilation, time_them=not args.cost_only)
    paper = []
    if family.name in (SD15.name, SDXL.name):
        sd15 = counter if family.name == SD15.name else MetaCostCounter(SD15)
        paper = table1_rows(sd15, counter if family.name == SDXL.name else None)
    settings = {
        "output": f"{plan.output_width}x{plan.output_height}", "plan": plan.describe(),
        "dtype": str(dtype).removeprefix("torch."),
        "vae_dtype": str(vae_dtype).removeprefix("torch.") if vae_dtype else None,
        "repeats": args.repeats, "warmup": args.warmup, "prompt": args.prompt,
        "negative_prompt": args.negative_prompt, "guidance": args.guidance, "seed": args.seed,
        "dilation": args.dilation, "reschedule": not args.no_reschedule, "relay": "pixel",
        "cost_only": args.cost_only,
    }
    result = BenchResult(family.name, settings, environment(device), peak, source, results,
                         speedups(results) if not args.cost_only else [], paper, notes(family))
    paths = write_reports(result, out_dir)
    print("\n".join(summary_table(result)))
    for s in result.speedups:
        print(f"{s.engine} over {s.over}: {s.factor:.2f}x")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("mf-bench", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
