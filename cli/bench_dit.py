"""`mf-bench --model sd3 | flux | tiny-sd3 | tiny-flux`: the flow pipeline's variants beside direct, with costs,
and the extra conditions (--lora, --controlnet, --ip-adapter, --image) as a conditioned row per variant
(benchmarks/dit_bench.py). Every check of the user's input comes before the model load, as mf-generate's."""
from __future__ import annotations

import argparse
import os

from .common import UsageError

_NOT_FOR_DIT = (("--cold-start", "cold_start"), ("--compile-cache", "compile_cache"))


def _refusals(args: argparse.Namespace, family) -> None:
    from ..core.dit_families import no_dilation_why, no_negative_prompt_why

    name = family.name
    if args.dilation is not None:
        raise UsageError(f"--dilation {args.dilation}: {no_dilation_why(family)}")
    if family.kind == "flux" and args.negative_prompt:
        raise UsageError(f"--negative-prompt: {no_negative_prompt_why(family)}")
    for flag, attr in _NOT_FOR_DIT:
        if getattr(args, attr) is not None:
            raise UsageError(f"{flag}: mf-bench does not take it for {name} yet")


def _variants(args: argparse.Namespace, family, device) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from ..benchmarks.dit_bench import DIT_VARIANTS

    from .bench import _list_arg, variant_list

    names = variant_list(args, device, DIT_VARIANTS, f"not available for {family.name}:")

    direct_for = _list_arg(args.direct_for, names, "--direct-for")
    if not args.cost_only and set(direct_for) - set(names):
        raise UsageError(f"--direct-for {args.direct_for}: {', '.join(sorted(set(direct_for) - set(names)))} "
                         f"is not among the variants timed ({', '.join(names)})")
    return names, direct_for


def check_engine_variants(args: argparse.Namespace, family, plan, names, direct_for, device, precision: str,
                          batch: int, conds) -> None:
    """The engines:<backend> variants: --engine-dir given, the backend usable here, no conditions (their rows run
    the torch variants), and the folder's transformer engines serving the plan (and the direct plan where
    --direct-for asks), as mf-generate --engines checks them: one line with the build command, before any load."""
    from ..benchmarks.variants import ENGINE_FOLDER_PREFIX, direct_plan
    from ..engine.backend import BackendUnavailable, get_backend
    from ..engine.cache import EngineError
    from ..engine.dit_engines import dit_engine_kinds

    engines = [n for n in names if n.startswith(ENGINE_FOLDER_PREFIX)]
    if not engines or args.cost_only:
        return
    if not args.engine_dir:
        raise UsageError(f"--variants {','.join(engines)}: needs --engine-dir (an mf-build-engines folder)")
    if not os.path.isdir(args.engine_dir):
        raise UsageError(f"--engine-dir {args.engine_dir!r}: no such folder")
    if conds:
        raise UsageError(f"{conds.label()} with --variants {','.join(engines)}: {family.name}'s conditioned rows run "
                         "the torch variants only (torch, graphs, compiled); leave out the engines")
    for kind in engines:
        backend = kind.removeprefix(ENGINE_FOLDER_PREFIX)
        try:
            get_backend(backend).check_available(str(device))
        except BackendUnavailable as e:
            raise UsageError(f"--variants {kind}: {e}") from None
        for p in [plan] + ([direct_plan(family, plan)] if kind in direct_for else []):
            try:
                dit_engine_kinds()[backend].check(args.engine_dir, family, p, device, precision, batch)
            except EngineError as e:
                raise UsageError(f"--variants {kind}: {e}") from None


def dit_conditions_from_args(args: argparse.Namespace, family, plan):
    """--lora, --controlnet, --ip-adapter and --image checked as mf-generate checks them for these families
    (cli/generate_flow.py), before any load."""
    from ..benchmarks.dit_bench import DiTConditions, IPAdapterInput
    from ..core.dit_lora import check_dit_lora_file
    from ..core.lora import LoraError
    from ..runtime.controlnet import ControlInputError
    from ..runtime.flow_controlnet import check_flow_controlnet_folder
    from ..runtime.flow_img2img import flow_entry_point
    from .conditions import controls_from_args, image_start_from_args, ip_adapter_from_args, loras_from_args

    controls = controls_from_args(args)
    loras = loras_from_args(args.lora)
    try:
        for c in controls:
            check_flow_controlnet_folder(c[0], family)
        for spec in loras:
            check_dit_lora_file(spec, family)
    except (ControlInputError, LoraError) as e:
        raise UsageError(str(e)) from None
    ip_image = ip_adapter_from_args(args)
    if ip_image is not None and family.kind == "sd3":
        from .generate_flow import _check_sd3_ip_adapter

        _check_sd3_ip_adapter(args)
    image = image_start_from_args(args, plan, flow_entry_point)
    ip = None if ip_image is None else IPAdapterInput(args.ip_adapter, args.ip_adapter_encoder,
                                                      args.ip_adapter_scale, ip_image)
    return DiTConditions(tuple(loras), tuple(controls), image, ip)


def run_dit_bench(args: argparse.Namespace, family) -> int:
    import torch

    from ..benchmarks.bench import BenchResult, notes, resolve_peak, run_variants, speedups
    from ..benchmarks.dit_bench import DIT_CONDITIONS_NOTE, DIT_NOTES, dit_cost, dit_cost_variants, dit_variants
    from ..benchmarks.dit_flops import SD3_NOTE, DiTCostCounter
    from ..benchmarks.timing import environment
    from ..core.lora import LoraError
    from ..runtime.controlnet import ControlInputError
    from ..runtime.flow_pipeline import FlowGenerationOptions
    from ..runtime.ipadapter import IPAdapterError
    from .bench import bench_settings, report, timing_args
    from .common import (DTYPES, parse_guidance, parse_seed, plan_from_args, warn_truncated_prompts,
                         weights_seed_from_args)

    _refusals(args, family)
    weights_seed = weights_seed_from_args("mf-bench", family, args, takes_dit=True)
    guidance = parse_guidance(args.guidance if args.guidance is not None else str(family.default_guidance))
    seed = parse_seed(args.seed)
    plan = plan_from_args(family, args.size, args.stages, args.steps)
    out_dir, device = timing_args(args)
    kinds, direct_for = _variants(args, family, device)
    conds = dit_conditions_from_args(args, family, plan)
    opts = FlowGenerationOptions(args.prompt, args.negative_prompt, guidance, seed, not args.no_reschedule)
    counter = DiTCostCounter(family)
    cfg = guidance > 1.0
    # bf16 on CUDA, as mf-generate: SD3.5 and FLUX ship in bf16, and T5 overflows fp16's range.
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    precision = next(k for k, v in DTYPES.items() if v == dtype)  # engines are built in the model's dtype
    check_engine_variants(args, family, plan, kinds, direct_for, device, precision, 2 if cfg and family.cfg else 1,
                          conds)
    cond_cost = None
    if conds:  # the ControlNets' and the IP-Adapter's counters, from their files: a bad one is refused now
        cond_cost = dit_cost(plan, conds, opts.relay)
        try:
            cond_cost(counter, cfg, 1)
        except (ControlInputError, IPAdapterError) as e:
            raise UsageError(str(e)) from None
    vae = DTYPES[args.vae_dtype] if args.vae_dtype else None
    print(f"plan: {plan.describe()}")
    if conds:
        print(f"conditions: {conds.label()} (each variant timed with them too)")
    if args.cost_only:
        peak, source = (args.peak_tflops, "given on the command line") if args.peak_tflops else (None, None)
        variants = dit_cost_variants(family, plan, conds, opts.relay, cond_cost)
    else:
        from ..core.loading import load_model

        bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle, device, dtype,
                            seed=weights_seed)
        warn_truncated_prompts("mf-bench", bundle.tokenizers[:-1],
                               {"--prompt": args.prompt, "--negative-prompt": args.negative_prompt})
        print(f"model {family.name} ({bundle.source}) on {device}, transformer "
              f"{str(bundle.transformer.dtype).removeprefix('torch.')}")
        peak, source = resolve_peak(device, args.peak_tflops, not args.no_peak)
        try:
            variants = dit_variants(bundle, plan, opts, device, kinds, direct_for, conds, vae, cond_cost,
                                    args.engine_dir, precision)
        except (LoraError, ControlInputError, IPAdapterError) as e:  # a file that does not fit the model
            raise UsageError(str(e)) from None
        vae = bundle.vae.dtype
    results = run_variants(variants, family, device, args.repeats, args.warmup, peak, counter, cfg=cfg,
                           dilation=1, time_them=not args.cost_only)
    settings = {**bench_settings(args, plan, dtype, vae, guidance, seed, None, opts.relay),
                "denoiser": "transformer", "cfg_batch": 2 if cfg and family.cfg else 1}
    extra = list(DIT_NOTES) + ([SD3_NOTE] if family.kind == "sd3" and not family.tiny else [])
    if conds:
        settings["conditions"] = conds.describe(plan)
        extra.append(DIT_CONDITIONS_NOTE)
    general = [n for n in notes(family) if "UNet" not in n]  # timing, direct rows, memory
    result = BenchResult(family.name, settings, environment(device), peak, source, results,
                         speedups(results) if not args.cost_only else [], [], general + extra, [])
    return report(result, out_dir)
