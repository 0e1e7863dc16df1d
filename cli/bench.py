"""`mf-bench`: direct, the eager diffusers-style baseline and the engine, timed in one process, with costs."""
from __future__ import annotations

import argparse
import math
import os
import sys

from .common import (ArgumentParser, UsageError, add_device_arguments, add_model_arguments,
                     add_plan_arguments, run_main, weights_source_from_args)
from .conditions import add_control_arguments, add_image_arguments, add_ip_adapter_arguments


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="mf-bench",
        description="Time MegaFusion against direct generation and an eager diffusers baseline; count its cost.",
    )
    add_model_arguments(p, "tiny-sdxl")
    add_plan_arguments(p)
    p.add_argument("--output", required=True, help="folder for results.json, report.md and chart.png (required)")
    add_device_arguments(p)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant, median reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first (default: %(default)s)")
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse", help="(default: %(default)r)")
    p.add_argument("--negative-prompt", default="", help="(default: none)")
    p.add_argument("--guidance", metavar="W",
                   help="classifier-free guidance weight, a finite number >= 0 (default: 7.0); at 1 or below CFG is "
                        "off; sd3 and flux default to their family's (FLUX takes it as its guidance embedding)")
    p.add_argument("--seed", default="0", metavar="N", help="noise seed, an integer 0 <= N < 2^64 (default: %(default)s)")
    p.add_argument("--dilation", type=int, metavar="D",
                   help="mid-block dilation at stages after the first, 1 to 8 (default: 2, the paper's)")
    p.add_argument("--no-reschedule", action="store_true", help="no noise re-scheduling")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s to compare with, > 0 (default: measured on GPU)")
    p.add_argument("--no-peak", action="store_true", help="do not measure the 8192^3 fp16 matmul peak")
    p.add_argument("--cost-only", action="store_true", help="count costs only: build nothing, time nothing")
    p.add_argument("--variants", help="engine variants to time, comma-separated: torch, graphs, compiled, "
                                      "compiled-fp8 (FP8 UNet projections; Ada or Hopper), compiled-fp8-static (with "
                                      "static input scales; one FP8 compiled variant per run), engines:aoti, "
                                      "engines:aoti-fp8 (the folder's --precision fp8 packages), engines:aoti-fp8-static "
                                      "(--fp8-scales static ones), engines:onnxruntime (the engines: ones from "
                                      "--engine-dir) (default: torch, graphs, compiled on CUDA, torch on CPU)")
    p.add_argument("--engine-dir", help="engine folder of mf-build-engines for the engines:<backend> variants (the "
                                        "direct rows need the direct plan's shapes built there too)")
    p.add_argument("--direct-for", metavar="VARIANTS",
                   help="variants that get a direct row on their own networks, comma-separated, or 'none' "
                        "(default: every variant timed)")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="the compiled variant starts from (and adds to) this compile cache, as mf-generate "
                        "--compile-cache (default: none; with --cold-start compiled, the one those runs filled)")
    p.add_argument("--cold-start", metavar="MODES",
                   help="also time fresh mf-generate processes to the first image, comma-separated: engines:aoti, "
                        "engines:onnxruntime (from --engine-dir), compiled (twice: empty caches, then the compile "
                        "cache the first run filled)")
    add_image_arguments(p)
    add_control_arguments(p)
    add_ip_adapter_arguments(p)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="also time each variant with this LoRA (.safetensors) times SCALE (default 1): fused on the "
                        "torch variants, swapped into the engines (the swap timed apart); repeatable")
    # Was the name of --variants; refused rather than dropped, since mf-generate's --engines is an engine folder.
    p.add_argument("--engines", help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    from ..core.families import pixel_family_names

    if args.model in pixel_family_names():  # DeepFloyd IF: cli/bench_if.py
        from .bench_if import run_if_bench

        given = [f for f, v in (("--lora", args.lora), ("--controlnet", args.controlnet), ("--image", args.image),
                                ("--ip-adapter", args.ip_adapter)) if v]
        if given:
            raise UsageError(f"{' and '.join(given)}: mf-bench takes the extra conditions for the latent families "
                             f"(SD1.5, SDXL, SD3, FLUX), not {args.model}")
        return run_if_bench(args, build_parser())
    from .common import (dilation_from_args, model_dtype, parse_guidance, parse_seed, plan_from_args, vae_dtype,
                         warn_truncated_prompts, weights_seed_from_args)
    from ..core.families import SD15, SDXL
    from ..core.loading import resolve_family

    from ..benchmarks.bench import BenchResult, cost_variants, notes, resolve_peak, run_variants, speedups
    from ..benchmarks.flops import MetaCostCounter
    from ..benchmarks.paper import table1_rows
    from ..benchmarks.timing import environment

    family = resolve_family(args.model, args.model_path)  # a local folder's config gives the native size
    if family.kind in ("sd3", "flux"):  # the flow-matching transformers: cli/bench_dit.py
        from .bench_dit import run_dit_bench

        return run_dit_bench(args, family)
    # Every check of the user's input comes before the model load and the runs.
    if args.engines is not None:
        raise UsageError(f"--engines {args.engines}: mf-bench names the variants to time with --variants "
                         f"(--variants {args.engines}); mf-generate's --engines is an engine folder")
    weights_seed = weights_seed_from_args("mf-bench", family, args)
    guidance, seed = parse_guidance(args.guidance if args.guidance is not None else "7.0"), parse_seed(args.seed)
    dilation = dilation_from_args(args.dilation)
    plan = plan_from_args(family, args.size, args.stages, args.steps)
    out_dir, device = timing_args(args)
    from ..benchmarks.variants import ENGINE_FOLDER_PREFIX, ENGINES, FP8_COMPILED, engine_folder_variant

    variant_names = variant_list(args, device, ENGINES, "unknown variant(s)")
    if not args.cost_only:
        from ..engine.fp8 import fp8_unavailable

        fp8_engines = [n for n in variant_names if n.startswith(ENGINE_FOLDER_PREFIX)
                       and engine_folder_variant(n)[1] == "fp8"]
        # FP8 engines run on the CPU too (the tiny models' tests); a GPU needs FP8 tensor cores, as compiled-fp8
        fp8_compiled = [n for n in variant_names if n in FP8_COMPILED]
        fp8 = [n for n in variant_names if n in fp8_compiled or (n in fp8_engines and device.type == "cuda")]
        why = fp8_unavailable(device, f"--variants {fp8[0]}") if fp8 else ""
        if why:
            raise UsageError(why)
        if len(fp8_compiled) > 1:
            raise UsageError(f"--variants {args.variants}: {' and '.join(fp8_compiled)} both quantize the shared UNet "
                             "in place; time one of them per mf-bench run")
        given = [f for f, v in (("--lora", args.lora), ("--controlnet", args.controlnet),
                                ("--ip-adapter", args.ip_adapter)) if v]
        if fp8_engines and given:
            raise UsageError(f"{given[0]} with --variants {fp8_engines[0]}: FP8 packages are built for the plain UNet "
                             "and take no weight swap; time the conditions on the other variants")
    direct_for = _list_arg(args.direct_for, variant_names, "--direct-for")
    if not args.cost_only and set(direct_for) - set(variant_names):
        raise UsageError(f"--direct-for {args.direct_for}: {', '.join(sorted(set(direct_for) - set(variant_names)))} "
                         f"is not among the variants timed ({', '.join(variant_names)})")
    cold = _list_arg(args.cold_start, (), "--cold-start")
    bad = [c for c in cold if c not in ("compiled", "engines:aoti", "engines:onnxruntime")]
    if bad:
        raise UsageError(f"--cold-start {args.cold_start}: unknown mode(s) {', '.join(map(repr, bad))}; choose from "
                         f"compiled, engines:aoti, engines:onnxruntime")
    if not args.cost_only and any(n.startswith("engines:") for n in (*variant_names, *cold)):
        if not args.engine_dir:
            raise UsageError("--variants/--cold-start engines:<backend> need --engine-dir (an mf-build-engines folder)")
        if not os.path.isdir(args.engine_dir):
            raise UsageError(f"--engine-dir {args.engine_dir!r}: no such folder")
    conditions = _conditions_from_args(args, plan, variant_names, family)
    dtype = model_dtype(device, args.dtype)
    print(f"plan: {plan.describe()}")
    if conditions:
        print(f"conditions: {conditions.label()} (each variant timed with them too)")
    colds, compile_cache = [], args.compile_cache
    if cold and not args.cost_only:  # first, while this process holds no device memory of its own
        import shutil

        from ..benchmarks.cold_start import run_cold

        out_dir.mkdir(parents=True, exist_ok=True)
        if "compiled" in cold:  # ours to empty; the in-process compiled variant then starts from what it saved
            compile_cache = str(out_dir / "compile-cache")
            shutil.rmtree(compile_cache, ignore_errors=True)
        for name, child, env in _cold_commands(args, cold, plan, guidance, seed, out_dir):
            print(f"cold start {name}: a fresh mf-generate process ...", flush=True)
            c = run_cold(name, child, device, env)
            colds.append(c)
            print(f"  {c.seconds:.1f} s (exit {c.returncode}), device peak "
                  f"{'–' if c.device_peak_gib is None else f'{c.device_peak_gib:.1f} GiB'}", flush=True)
    counter = MetaCostCounter(family)
    vae = None
    if args.cost_only:
        peak, source = (args.peak_tflops, "given on the command line") if args.peak_tflops else (None, None)
        from ..runtime.controlnet import ControlInputError
        from ..runtime.ipadapter import IPAdapterError

        try:
            variants = cost_variants(family, plan, conditions)
        except (ControlInputError, IPAdapterError) as e:
            raise UsageError(str(e)) from None
    else:
        from ..core.loading import load_model
        from ..runtime.pipeline import GenerationOptions

        from ..benchmarks.variants import default_variants
        from ..core.lora import LoraError
        from ..runtime.controlnet import ControlInputError
        from ..runtime.ipadapter import IPAdapterError

        check_engine_folder(args, family, plan, variant_names, direct_for, weights_seed, dilation, device)
        bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle, device, dtype,
                            seed=weights_seed)
        warn_truncated_prompts("mf-bench", bundle.tokenizers,
                               {"--prompt": args.prompt, "--negative-prompt": args.negative_prompt})
        vae = vae_dtype(family, bundle.vae.config, dtype, args.vae_dtype, device)
        if bundle.vae.dtype != vae:  # every variant shares the modules, so the same VAE precision
            bundle.vae.to(dtype=vae)
        print(f"model {family.name} ({bundle.source}) on {device}, UNet {dtype}, VAE {vae}")
        peak, source = resolve_peak(device, args.peak_tflops, not args.no_peak)
        opts = GenerationOptions(args.prompt, args.negative_prompt, guidance, seed, not args.no_reschedule, dilation)
        engine_bundle = None
        if any(n.startswith("engines:") for n in variant_names):  # loaded as mf-build-engines loads it
            engine_bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle,
                                       seed=weights_seed)
        try:
            variants = default_variants(bundle, plan, opts, device, variant_names, args.engine_dir, direct_for,
                                        compile_cache, engine_bundle, conditions)
        except (LoraError, ControlInputError, IPAdapterError) as e:  # a file that does not fit the model
            raise UsageError(str(e)) from None
    results = run_variants(variants, family, device, args.repeats, args.warmup, peak, counter,
                           cfg=guidance > 1.0, dilation=dilation, time_them=not args.cost_only)
    paper = []
    if family.name in (SD15.name, SDXL.name):
        sd15 = counter if family.name == SD15.name else MetaCostCounter(SD15)
        paper = table1_rows(sd15, counter if family.name == SDXL.name else None)
    settings = bench_settings(args, plan, dtype, vae, guidance, seed, dilation, "pixel")
    extra_notes = []
    if conditions:
        from ..benchmarks.bench import CONDITIONS_NOTE

        settings["conditions"] = conditions.describe(plan)
        extra_notes.append(CONDITIONS_NOTE)
    result = BenchResult(family.name, settings, environment(device), peak, source, results,
                         speedups(results) if not args.cost_only else [], paper, notes(family) + extra_notes, colds)
    return report(result, out_dir)


def bench_settings(args: argparse.Namespace, plan, dtype, vae, guidance: float, seed: int, dilation,
                   relay: str) -> dict:
    """results.json's settings: what a run was asked for."""
    return {
        "output": f"{plan.output_width}x{plan.output_height}", "plan": plan.describe(),
        "dtype": str(dtype).removeprefix("torch."),
        "vae_dtype": str(vae).removeprefix("torch.") if vae else None,
        "repeats": args.repeats, "warmup": args.warmup, "prompt": args.prompt,
        "negative_prompt": args.negative_prompt, "guidance": guidance, "seed": seed,
        "dilation": dilation, "reschedule": not args.no_reschedule, "relay": relay,
        "cost_only": args.cost_only,
    }


def check_engine_folder(args, family, plan, variant_names, direct_for, weights_seed: int, dilation: int,
                        device) -> None:
    """The --engine-dir entries each engines: variant opens (and, with --direct-for, those of the direct plan), chosen
    by the weights' origin as mf-generate --engines chooses them: a folder that lacks some is one line with the
    build command before the model loads, not after."""
    from ..benchmarks.variants import ENGINE_FOLDER_PREFIX, direct_plan, engine_folder_scales, engine_folder_variant
    from ..engine.cache import EngineError
    from ..engine.load import select_engines

    source = weights_source_from_args(args, family, weights_seed)
    for kind in variant_names:
        if not kind.startswith(ENGINE_FOLDER_PREFIX):
            continue
        backend, precision = engine_folder_variant(kind)
        plans = [(plan, dilation if len(plan.stages) > 1 else 1)]  # a one-stage plan runs no dilated UNet
        if kind in direct_for:
            plans.append((direct_plan(family, plan), 1))
        for p, d in plans:
            try:
                select_engines(args.engine_dir, family, source, p, d, "pixel", device, backend, precision,
                               fp8_scales=engine_folder_scales(kind))
            except EngineError as e:
                raise UsageError(f"--variants {kind}: {e}") from None


def report(result, out_dir) -> int:
    """The JSON and markdown reports written, the summary and speed-ups printed."""
    from ..benchmarks.report import summary_table, write_reports

    paths = write_reports(result, out_dir)
    print("\n".join(summary_table(result)))
    for s in result.speedups:
        print(f"{s.engine} over {s.over}: {s.factor:.2f}x")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _conditions_from_args(args, plan, variant_names: tuple[str, ...], family):
    """The --lora, --controlnet, --ip-adapter and --image inputs, checked as mf-generate checks them
    (cli/conditions.py), before any load; the combinations mf-generate refuses are refused here too."""
    from ..benchmarks.conditions import Conditions, IPAdapterInput
    from .conditions import controls_from_args, image_start_from_args, ip_adapter_from_args, loras_from_args

    image = image_start_from_args(args, plan)
    loras = loras_from_args(args.lora)
    controls = controls_from_args(args)
    engines = [n for n in variant_names if n.startswith("engines:")]
    if controls and engines and loras:  # a swap would reach the plain UNet engines, not the controlled ones
        raise UsageError(f"--lora with --variants {','.join(engines)} and --controlnet: the ControlNet engines hold "
                         "the base UNet; build them from the LoRA's weights (mf-build-engines --lora ... "
                         "--controlnet ...) and leave out --lora here")
    ip_image = ip_adapter_from_args(args)
    if ip_image is not None and engines:
        raise UsageError(f"--ip-adapter with --variants {','.join(engines)}: the IP-Adapter runs on the torch "
                         "variants only (torch, graphs, compiled), as mf-generate's; leave out the engines")
    ip = None if ip_image is None else IPAdapterInput(args.ip_adapter, args.ip_adapter_encoder,
                                                      args.ip_adapter_scale, ip_image)
    return Conditions(tuple(loras), tuple(controls), image, ip)


def timing_args(args: argparse.Namespace):
    """--repeats, --warmup and --peak-tflops checked; the --output folder and the device (the CPU for --cost-only)."""
    from .common import output_folder_from_args, resolve_device

    if args.repeats < 1 or args.warmup < 0:
        raise UsageError("--repeats must be at least 1 and --warmup at least 0")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        raise UsageError(f"--peak-tflops {args.peak_tflops:g}: must be a finite number > 0 (TFLOP/s)")
    out_dir = output_folder_from_args("--output", args.output)
    device = resolve_device("cpu" if args.cost_only else args.device)
    return out_dir, device


def variant_list(args: argparse.Namespace, device, known, unknown_said: str,
                 gpu_only=("graphs", "compiled", "compiled-fp8", "compiled-fp8-static")) -> tuple[str, ...]:
    """--variants as names (default: torch, graphs, compiled on CUDA, torch on CPU), each one of `known`, and
    the GPU-only ones refused on a CPU, where they would run eagerly under a label they do not earn."""
    names = tuple(n.strip() for n in (args.variants or "").split(",") if n.strip())
    if args.variants is not None and not names:
        raise UsageError(f"--variants {args.variants!r}: name at least one variant (torch, graphs, compiled)")
    if args.cost_only:
        return names
    names = names or (("torch", "graphs", "compiled") if device.type == "cuda" else ("torch",))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--variants {args.variants}: {unknown_said} {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(known)}")
    gpu = [n for n in names if n in gpu_only]
    if gpu and device.type != "cuda":
        raise UsageError(f"--variants {args.variants}: {' and '.join(gpu)} "
                         f"{'needs' if len(gpu) == 1 else 'need'} a CUDA device (got {device}); on the CPU only "
                         "torch runs")
    return names


def _list_arg(value: str | None, default: tuple[str, ...], flag: str) -> tuple[str, ...]:
    if value is None:
        return default
    if value.strip() == "none":
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise UsageError(f"{flag} {value!r}: name at least one, or 'none'")
    return names


def _cold_commands(args, modes, plan, guidance, seed, out_dir):
    """(row name, mf-generate arguments, extra environment) per fresh process to time."""
    base = ["--model", args.model, "--stages", ",".join(str(s) for s in plan.stages), "--device", args.device,
            "--prompt", args.prompt, "--negative-prompt", args.negative_prompt, "--guidance", str(guidance),
            "--seed", str(seed), "--no-progress"]
    if args.model_path:
        base += ["--model-path", args.model_path]
    elif args.random_weights:
        base += ["--random-weights"]
    if args.weights_seed is not None:
        base += ["--weights-seed", str(args.weights_seed)]
    if args.dtype:
        base += ["--dtype", args.dtype]
    if args.vae_dtype:
        base += ["--vae-dtype", args.vae_dtype]
    out = []
    for mode in modes:
        png = ["--output", str(out_dir / f"cold-{mode.replace(':', '-')}.png")]
        if mode.startswith("engines:"):
            out.append((mode, [*base, "--engines", args.engine_dir, *png], {}))
            continue
        cache = out_dir / "compile-cache"  # emptied by the caller
        for label in ("compiled, empty caches", "compiled, warm compile cache"):
            # Only megafusion's compile cache carries work over: Inductor's and Triton's caches inside it, where
            # mf-generate puts them when the user's environment names none (engine/compile_cache.py).
            inductor = {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                        "TRITON_CACHE_DIR": str(cache / "inductor" / "triton" / "0")}
            out.append((label, [*base, "--mode", "compiled", "--compile-cache", str(cache), *png], inductor))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..engine.cache import EngineError

    return run_main("mf-bench", lambda: run(args), fatal=(EngineError,))


if __name__ == "__main__":
    sys.exit(main())
