"""`mf-generate --model tiny-if|if`: pixel-space MegaFusion on a DeepFloyd IF cascade (docs/ALGORITHM.md §20).

`--stages` is cascade stage I's plan, `--stages-2` stage II's; `--guidance` and `--guidance-2` their CFG weights.
The image written is stage II's output (stage I's when only a stage I folder is given).
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import UsageError


def _if_plan(family, cascade: int, text: str | None, flag: str):
    from ..core.plan import parse_stages
    from ..runtime.pixel_pipeline import pixel_plan

    if text is None:
        return pixel_plan(family, cascade)
    if not text.strip():
        raise UsageError(f"{flag} {text!r}: give at least one stage, e.g. 64x64:80,128x128:20")
    return pixel_plan(family, cascade, parse_stages(text))


def if_weights_seed(args: argparse.Namespace, family) -> int:
    """The IF weights flags, checked alike by mf-generate and mf-build-engines: one source of weights, a seed only
    for random ones; returns the weights seed."""
    from .common import parse_seed

    if args.random_weights and args.model_path:
        raise UsageError("--model-path and --random-weights exclude each other")
    if not (family.tiny or args.random_weights or args.model_path):
        raise UsageError(f"--model {family.name} needs --model-path DIR (an IFPipeline folder) or --random-weights")
    weights_seed = parse_seed(args.weights_seed, "--weights-seed")
    if weights_seed and args.model_path:
        raise UsageError(f"--weights-seed {args.weights_seed}: only random weights have a seed")
    if args.stage_2_path and not args.model_path:
        raise UsageError("--stage-2-path needs --model-path (the stage I folder) too")
    return weights_seed


def run_if(args: argparse.Namespace) -> int:
    """Checks every flag before loading anything, then generates and writes the PNG."""
    from ..core.if_family import get_if_family
    from .common import (dilation_from_args, mode_from_args, model_dtype, output_file_from_args, parse_guidance,
                         parse_seed, resolve_device)

    family = get_if_family(args.model)
    for flag, value in (("--size", args.size), ("--steps", args.steps), ("--inductor", args.inductor),
                        ("--compile-cache", args.compile_cache), ("--vae-dtype", args.vae_dtype),
                        ("--max-memory", args.max_memory)):
        if value is not None:
            raise UsageError(f"{flag} does not apply to {family.name} (a pixel-space cascade); "
                             "give --stages and --stages-2 instead of --size or --steps")
    if args.relay != "pixel":
        raise UsageError(f"--relay {args.relay}: {family.name} has no latent; its relay is in pixels")
    weights_seed = if_weights_seed(args, family)
    plan_1 = _if_plan(family, 1, args.stages, "--stages")
    run_2 = args.model_path is None or args.stage_2_path is not None
    plan_2 = _if_plan(family, 2, args.stages_2, "--stages-2") if run_2 else None
    from ..runtime.pixel_pipeline import PixelOptions

    try:
        opts = PixelOptions(args.prompt, args.negative_prompt,
                            parse_guidance(args.guidance if args.guidance is not None else "7.0"),
                            parse_guidance(args.guidance_2 if args.guidance_2 is not None else str(family.guidance_2),
                                           "--guidance-2"), parse_seed(args.seed),
                            not args.no_reschedule, dilation_from_args(args.dilation, args.no_dilation))
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = output_file_from_args("--output", args.output)
    device = resolve_device(args.device)
    mode = mode_from_args(args.mode, device)
    if args.engines and mode == "compiled":
        raise UsageError("--mode compiled compiles the torch modules; with --engines use --mode graphs or eager")
    if args.engines and args.dtype not in (None, "fp32", "fp16"):
        raise UsageError(f"--dtype {args.dtype}: IF engines are fp32 or fp16")
    print(f"plan: stage I {plan_1.describe()}" + (f"; stage II {plan_2.describe()}" if plan_2 else ""))
    if args.dry_run:
        from ..benchmarks.flops import IFCostCounter

        counter = IFCostCounter(family)
        for cascade, plan, w in ((1, plan_1, opts.guidance_1), (2, plan_2, opts.guidance_2)):
            if plan is not None:
                c = counter.plan(cascade, plan, cfg=w > 1.0, dilation=opts.dilation)
                print(f"cost stage {'I' * cascade}: {c.macs / 1e9:,.1f} G-MACs (the paper's convention), "
                      f"{c.flops / 1e12:,.1f} TFLOP (UNet, attention included)")
        return 0

    from ..core.if_loading import load_if_model
    from ..runtime.pixel_pipeline import IFMegaFusionPipeline

    import torch

    # With engines the bundle stays float32 (its T5 encoder runs; the UNet weights are what the engine keys hash).
    dtype = torch.float32 if args.engines else model_dtype(device, args.dtype)
    bundle = load_if_model(args.model, args.model_path, args.stage_2_path, device, dtype,
                           seed=weights_seed, random_weights=args.random_weights)
    print(f"model {family.name} ({bundle.source}) on {device}")
    nets = None
    if args.engines:
        from ..engine.cache import EngineError
        from ..engine.if_engines import open_if_engines

        try:
            nets = open_if_engines(args.engines, bundle, device, precision=args.dtype)
        except EngineError as e:
            raise UsageError(str(e)) from None
        print(f"engines: {nets.backend} in {args.engines}")
        if mode != "eager" and not nets.capturable:
            from ..engine.backend import get_backend

            why = (f"{nets.backend} engines cannot run inside the runtime's CUDA graphs: "
                   f"{get_backend(nets.backend).capture_note}")
            if args.mode:
                raise UsageError(f"--mode {mode}: {why}; use --mode eager")
            print(f"{why}; running the stages eagerly")
            mode = "eager"
    print(f"mode {mode}" + (" (the first run compiles: minutes on real-size models)" if mode == "compiled" else ""))
    result = IFMegaFusionPipeline(bundle, device, mode, nets).generate(plan_1, plan_2, opts)
    for name, seconds in result.timings:
        print(f"  {name:<40} {seconds * 1000:10.1f} ms")
    print(f"  {'total':<40} {sum(s for _, s in result.timings) * 1000:10.1f} ms")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        from ..runtime.pipeline import encode_png

        tmp.write_bytes(encode_png(result.image))
        os.replace(tmp, out)  # never leave a half-written PNG under the requested name
    finally:
        tmp.unlink(missing_ok=True)
    h, w = result.image.shape[:2]
    print(f"wrote {out} ({w}x{h})")
    return 0


if __name__ == "__main__":
    sys.exit("run through mf-generate --model tiny-if")
