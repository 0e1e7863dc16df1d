"""`mf-bench`: direct, the eager diffusers-style baseline and the engine, timed in one process, with costs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (UsageError, add_device_arguments, add_model_arguments,
                                          add_plan_arguments, run_main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mf-bench",
        description="Time MegaFusion against direct generation and an eager diffusers baseline; count its cost.",
    )
    add_model_arguments(p, "sdxl")
    add_plan_arguments(p)
    p.add_argument("--output", required=True, help="folder for results.json, report.md and chart.png")
    add_device_arguments(p)
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
    from .common import model_dtype, plan_from_args, resolve_device, vae_dtype, weights_seed_from_args
    from ..core.families import SD15, SDXL, get_family

    from ..benchmarks.bench import BenchResult, cost_variants, notes, resolve_peak, run_variants, speedups
    from ..benchmarks.flops import MetaCostCounter
    from ..benchmarks.paper import table1_rows
    from ..benchmarks.report import summary_table, write_reports
    from ..benchmarks.timing import environment

    family = get_family(args.model)
    weights_seed = weights_seed_from_args("mf-bench", family, args)
    plan = plan_from_args(family, args.size, args.stages, args.steps)
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0")
    if args.dilation < 1:
        raise UsageError(f"--dilation {args.dilation}: must be at least 1")
    out_dir = Path(args.output)
    device = resolve_device("cpu" if args.cost_only else args.device)
    dtype = model_dtype(device, args.dtype)
    print(f"plan: {plan.describe()}")
    counter = MetaCostCounter(family)
    vae = None
    if args.cost_only:
        peak, source = (args.peak_tflops, "given on the command line") if args.peak_tflops else (None, None)
        variants = cost_variants(family, plan)
    else:
        from ..core.loading import load_model
        from ..runtime.pipeline import GenerationOptions

        from ..benchmarks.variants import default_variants

        bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle, device, dtype,
                            seed=weights_seed)
        vae = vae_dtype(family, bundle.vae.config, dtype, args.vae_dtype)
        if bundle.vae.dtype != vae:  # every variant shares the modules, so the same VAE precision
            bundle.vae.to(dtype=vae)
        print(f"model {family.name} ({bundle.source}) on {device}, UNet {dtype}, VAE {vae}")
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
        "vae_dtype": str(vae).removeprefix("torch.") if vae else None,
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
