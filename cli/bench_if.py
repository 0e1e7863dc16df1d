"""`mf-bench --model tiny-if|if`: both cascade stages' MegaFusion plans against direct on the same variant, times and
costs in one report (megafusion.benchmarks.if_bench; OUTPUT/if_megafusion.json and .md).

The plans, prompt, guidance and seed are the paper's Table 1 setting (fixed); the tiny model runs them with every
stage's steps cut to 5% (a CPU smoke test). Variants: eager (or torch), graphs, compiled, engines:onnxruntime,
engines:aoti (from --engine-dir, built with mf-build-engines --model ... for both the MegaFusion and the direct
plans' shapes); engines variants run alone in a process (the others cast the UNets, whose float32 weights the
engines check).
"""
from __future__ import annotations

import argparse

from .common import UsageError

_LATENT_ONLY = ("size", "stages", "steps", "negative_prompt", "dilation", "no_reschedule", "peak_tflops",
                "no_peak", "cost_only", "direct_for", "compile_cache", "cold_start", "vae_dtype", "prompt",
                "guidance", "seed")
"""mf-bench flags this benchmark does not take (Table 1's setting is fixed); refused when given another value."""

_VARIANTS = {"eager": "eager", "torch": "eager", "graphs": "graphs", "compiled": "compiled",
             "engines:onnxruntime": "engines", "engines:aoti": "engines"}


def run_if_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Checks every flag before loading anything, then measures and writes the report."""
    from ..core.if_family import get_if_family
    from .common import output_folder_from_args, parse_seed, resolve_device

    family = get_if_family(args.model)
    for name in _LATENT_ONLY:
        if getattr(args, name) != parser.get_default(name):
            raise UsageError(f"--{name.replace('_', '-')} does not apply to {family.name}: its benchmark runs the "
                             "paper's Table 1 plans, prompt and guidance")
    if args.warmup != 1:
        raise UsageError(f"--warmup {args.warmup}: {family.name} plans warm up once (graph modes on the whole plan)")
    if args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if args.random_weights and args.model_path:
        raise UsageError("--model-path and --random-weights exclude each other")
    if not (family.tiny or args.random_weights or args.model_path):
        raise UsageError(f"--model {family.name} needs --model-path DIR (an IFPipeline folder) or --random-weights")
    weights_seed = parse_seed(args.weights_seed, "--weights-seed")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    variants = [v.strip() for v in (args.variants or ("eager,graphs,compiled" if cuda else "eager")).split(",")]
    bad = [v for v in variants if v not in _VARIANTS]
    if bad:
        raise UsageError(f"--variants {args.variants}: unknown {', '.join(map(repr, bad))}; choose from "
                         f"{', '.join(_VARIANTS)}")
    engines = [v for v in variants if v.startswith("engines:")]
    if engines and len(variants) > 1:
        raise UsageError(f"--variants {args.variants}: an engines variant runs alone (the other variants cast the "
                         "UNets, whose float32 weights the engines check)")
    if bool(engines) != (args.engine_dir is not None):
        raise UsageError("--variants engines:<backend> and --engine-dir DIR go together")
    if args.dtype not in (None, "fp32", "fp16"):
        raise UsageError(f"--dtype {args.dtype}: {family.name} runs in fp32 or fp16")
    if not cuda and "compiled" in variants:
        raise UsageError("--variants compiled needs a CUDA device here (the CPU compile takes minutes per shape)")
    dtypes = [args.dtype] if args.dtype else (["fp32", "fp16"] if cuda else ["fp32"])
    out = output_folder_from_args("--output", args.output)

    import torch

    from ..benchmarks.if_bench import run_if_benchmark
    from ..core.if_loading import load_if_model

    # Random weights drawn on the device, as mf-build-engines and mf-generate draw them; float32 (each variant
    # casts the UNets to its dtype; engines check the float32 weights).
    bundle = load_if_model(args.model, args.model_path, None, device, torch.float32, seed=weights_seed,
                           random_weights=args.random_weights)
    cascades = ("I", "II") if bundle.unet_2 is not None else ("I",)
    modes = list(dict.fromkeys(_VARIANTS[v] for v in variants))
    run_if_benchmark(bundle, device, out, dtypes, modes, args.repeats, cascades, args.engine_dir,
                     0.05 if family.tiny else 1.0, log=lambda s: print(s, flush=True),
                     engine_backend=engines[0].split(":")[1] if engines else None)
    print(f"wrote {out / 'if_megafusion.json'} and {out / 'if_megafusion.md'}")
    return 0
