"""`mf-generate`: one MegaFusion image from the command line."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .common import (ArgumentParser, UsageError, add_device_arguments, add_model_arguments,
                     add_plan_arguments, add_precision_argument, finish_generation, fp8_policy_from_args,
                     run_main)
from .conditions import (add_condition_arguments, controls_from_args, image_start_from_args, ip_adapter_from_args,
                         loras_from_args)
from .warm_start import check_compile_cache_flags, finish_compiled, keep_compiled_kernels, warm_start


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="mf-generate",
        description="Generate one image with MegaFusion (truncate and relay, coarse to fine).",
    )
    add_model_arguments(p, "tiny-sdxl")
    p.add_argument("--prompt", required=True, help="what the image shows (required)")
    p.add_argument("--negative-prompt", default="", help="what it should not show (default: none)")
    add_plan_arguments(p)
    p.add_argument("--guidance", metavar="W",
                   help="classifier-free guidance weight, a finite number >= 0 (default: 7.0); "
                        "at 1 or below CFG is off. FLUX: the value of its guidance embedding (default: 3.5)")
    p.add_argument("--seed", default="0", metavar="N",
                   help="noise seed, an integer 0 <= N < 2^64 (default: %(default)s)")
    p.add_argument("--no-dilation", action="store_true", help="no dilated mid block at the larger stages")
    p.add_argument("--dilation", type=int, metavar="D",
                   help="mid-block dilation at stages after the first, 1 to 8 (default: 2, the paper's)")
    p.add_argument("--no-reschedule", action="store_true", help="no noise re-scheduling")
    p.add_argument("--relay", choices=("pixel", "latent"), default="pixel",
                   help="between stages: VAE decode, bicubic, encode (pixel) or bicubic on the latent (latent) "
                        "(default: %(default)s)")
    add_device_arguments(p)
    add_precision_argument(p)
    p.add_argument("--output", default="megafusion.png", metavar="FILE.png",
                   help="PNG file to write (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mode", choices=("eager", "graphs", "fast-graphs", "compiled"),
                   help="eager loop; one CUDA graph per stage shape (default on CUDA); fast-graphs: those graphs "
                        "over the compiled path's module changes, not compiled (SD1.5/SDXL); or graphs around "
                        "torch.compile'd modules (fastest, compiles for minutes at first use)")
    p.add_argument("--inductor", metavar="SET",
                   help="with --mode compiled: a named Inductor option set (engine.torch_fast.INDUCTOR_SETS), e.g. "
                        "`tuned` (2%% faster, compiles for about 17 minutes)")
    p.add_argument("--engines", metavar="DIR", help="run from the engines mf-build-engines built in this folder")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="with --mode compiled: where compiled code is kept for the next process "
                        "(default: $MEGAFUSION_CACHE/compiled, else ~/.cache/megafusion/compiled)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="with --mode compiled: compile from scratch, save nothing")
    add_condition_arguments(p)
    p.add_argument("--max-memory", type=float, metavar="GiB",
                   help="refuse a plan whose estimated peak memory exceeds this (default: the device's memory)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, its estimated peak memory and its cost, then exit without loading anything")
    add_vae_tile_arguments(p)
    # DeepFloyd IF (--model tiny-if or if): the second cascade stage (cli/generate_if.py).
    p.add_argument("--stages-2", metavar="PLAN",
                   help="IF only: stage II's plan (default the paper's 256x256:40,512x512:10; --stages is stage I's)")
    p.add_argument("--guidance-2", metavar="W",
                   help="IF only: stage II's guidance weight (default: 4.0, the paper's; --guidance is stage I's)")
    p.add_argument("--stage-2-path", metavar="DIR",
                   help="IF only: the IFSuperResolutionPipeline folder (--model-path is the IFPipeline folder)")
    return p


def add_vae_tile_arguments(p: argparse.ArgumentParser) -> None:
    """--vae-tile, --no-vae-tile, --vae-tile-size (read back by `vae_tile_from_args`)."""
    tile = p.add_mutually_exclusive_group()
    tile.add_argument("--vae-tile", nargs="?", const="on", choices=("on", "park"),
                      help="run the VAE passes larger than one tile in tiles, with whole-image group-norm statistics; "
                           "`--vae-tile park` also parks the tiles waiting at a group norm in host memory, so the "
                           "device holds about one tile's activations (default: tiled only when the untiled "
                           "estimate exceeds --max-memory or the device's memory, parked only when the tiled one "
                           "does too)")
    tile.add_argument("--no-vae-tile", action="store_true", help="never tile the VAE passes")
    p.add_argument("--vae-tile-size", type=int, metavar="PX",
                   help="tile side in pixels when the VAE is tiled, a multiple of 64 (default: 2048)")


def vae_tile_from_args(args: argparse.Namespace):
    """(when, tiling): when is "auto", "on", "park" or "off"; checked before any load."""
    from ..runtime.vae_tiling import DEFAULT_TILE, VaeTiling, VaeTilingError

    if args.vae_tile_size is not None and args.no_vae_tile:
        raise UsageError("--vae-tile-size and --no-vae-tile exclude each other")
    try:
        tiling = VaeTiling(DEFAULT_TILE if args.vae_tile_size is None else args.vae_tile_size)
    except VaeTilingError as e:
        raise UsageError(f"--vae-tile-size {args.vae_tile_size}: {e}") from None
    return (args.vae_tile or ("off" if args.no_vae_tile else "auto")), tiling


def _fast_graphs_refused(instead: str) -> UsageError:
    return UsageError(f"--mode fast-graphs changes the torch modules of SD1.5/SDXL-layout models; {instead}")


def run(args: argparse.Namespace) -> int:
    from ..benchmarks.cold_start import process_age
    from ..core.families import pixel_family_names

    run_age = process_age()  # interpreter, imports, argument parsing: the first part of a cold start

    if args.mode == "fast-graphs" and args.engines:
        raise _fast_graphs_refused("with --engines use --mode graphs")
    if args.mode == "fast-graphs" and args.model in pixel_family_names():
        raise _fast_graphs_refused(f"for {args.model} use --mode graphs or compiled")
    if args.fp8_scales is not None and args.model in pixel_family_names():
        raise UsageError(f"--fp8-scales is for the SD1.5 and SDXL UNets, not {args.model}")
    if args.model in pixel_family_names():
        from .generate_if import run_if

        return run_if(args)
    for flag, value in (("--stages-2", args.stages_2), ("--guidance-2", args.guidance_2),
                        ("--stage-2-path", args.stage_2_path)):
        if value is not None:
            raise UsageError(f"{flag} applies to the IF models (tiny-if, if) only, not {args.model}")
    from ..engine.networks import TorchNetworks
    from .common import (dilation_from_args, generate_with_progress, mode_from_args, model_dtype,
                         output_file_from_args, parse_guidance, parse_seed, plan_from_args, resolve_device, vae_dtype,
                         warn_truncated_prompts, weights_seed_from_args, weights_source_from_args)
    from ..core.loading import load_model
    from ..core.loading import resolve_family

    from ..runtime.pipeline import GenerationOptions, MegaFusionPipeline

    family = resolve_family(args.model, args.model_path)  # a local folder's config gives the native size
    if family.kind in ("sd3", "flux"):  # diffusion transformers: the flow-matching stage loop
        if args.fp8_scales is not None:
            raise UsageError(f"--fp8-scales is for the SD1.5 and SDXL UNets; {family.name}'s FP8 transformer "
                             "scales its inputs per token")
        if args.mode == "fast-graphs":
            raise _fast_graphs_refused(f"for {family.name} use --mode graphs or compiled")
        from .generate_flow import run_flow

        return run_flow(args, family)
    # Every check of the user's input comes before the model load: a bad value costs no minutes.
    weights_seed = weights_seed_from_args("mf-generate", family, args)
    guidance, seed = parse_guidance(args.guidance if args.guidance is not None else "7.0"), parse_seed(args.seed)
    dilation = dilation_from_args(args.dilation, args.no_dilation)
    plan = plan_from_args(family, args.size, args.stages, args.steps)
    try:
        opts = GenerationOptions(args.prompt, args.negative_prompt, guidance, seed,
                                 not args.no_reschedule, dilation, args.relay)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = output_file_from_args("--output", args.output)
    image_start = image_start_from_args(args, plan)  # reads the photo: a bad file is refused before the load
    loras = loras_from_args(args.lora)
    controls = controls_from_args(args)  # reads the control images; the ControlNets load after the model
    if controls and args.engines and loras:  # a swap would reach the plain UNet engines, not the controlled ones
        raise UsageError("--lora with --engines and --controlnet: the ControlNet engines hold the base UNet; build "
                         "them from the LoRA's weights (mf-build-engines --lora ... --controlnet ...) and leave out "
                         "--lora here")
    ip_image = ip_adapter_from_args(args)
    if ip_image is not None and args.engines and (controls or loras):  # no engine takes both yet
        raise UsageError(f"--ip-adapter with --engines and {'--controlnet' if controls else '--lora'}: the IP-Adapter "
                         "engines hold the base UNet alone; leave out --engines (the torch path runs both)")
    if args.engines and args.precision == "fp8":
        from ..engine.fp8 import fp8_engines_conflict

        why = fp8_engines_conflict(bool(loras), bool(controls), ip_image is not None)
        if why:
            raise UsageError(why)
    if args.engines is not None and not Path(args.engines).is_dir():
        raise UsageError(f"--engines {args.engines!r}: no such folder; build one with mf-build-engines --output DIR")

    if args.inductor is not None:
        from ..engine.torch_fast import inductor_set

        try:
            inductor_set(args.inductor)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.mode != "compiled" or args.engines:
            raise UsageError(f"--inductor {args.inductor} needs --mode compiled (and no --engines)")
    check_compile_cache_flags(args)
    device = resolve_device(args.device)
    mode = mode_from_args(args.mode, device)
    dtype = model_dtype(device, args.dtype)
    if args.precision == "fp8":
        from .common import fp8_dtype_from_args

        dtype = fp8_dtype_from_args(device, args.dtype, args.engines, fp8_engines=True)
    precision = "fp8" if args.precision == "fp8" else args.dtype  # the engines' (their key's precision)
    fp8_policy = fp8_policy_from_args(args)
    fp8_scales = fp8_policy.activations if fp8_policy is not None else "token"  # which FP8 packages --engines opens
    tile = vae_tile_from_args(args)
    if args.engines and tile[0] in ("on", "park"):
        raise UsageError("--vae-tile runs on the PyTorch VAE, not on --engines")
    keep_compiled_kernels(args, mode)  # before anything imports Inductor, which fixes its cache folder
    t_estimate = time.perf_counter()
    tiling = _check_memory(args, family, plan, opts, device, dtype, tile, mode)
    estimate_s = time.perf_counter() - t_estimate
    if tiling is True:
        return 0  # --dry-run
    one_shot_allocator(args, device)
    if tiling is not None and args.engines:
        raise UsageError(f"this plan needs tiled VAE passes ({tiling.tile}-pixel tiles) to fit, which run on the "
                         "PyTorch VAE, not on --engines; leave out --engines or ask for a smaller --size")
    from ..benchmarks.cold_start import phase_line, start_line

    # Load and open times are printed: a fresh process's start is mostly these (benchmarks/cold_start.py reads them).
    t_load, started_s = time.perf_counter(), process_age()
    if args.engines:  # the engines were built from (and are checked against) fp32 CPU weights
        from ..core.loading import COMPONENTS, component_modules
        from ..engine.cache import EngineError
        from ..engine.load import select_engines

        source = weights_source_from_args(args, family, weights_seed)
        # Which engines run the plan, before the load: what they run needs no weights in torch. With --lora the model
        # loads whole: the files are checked against it before any engine is looked at, and the swap reads its
        # base weights.
        served = frozenset()
        if not loras:
            try:
                served = select_engines(args.engines, family, source, plan, dilation, args.relay, device,
                                        precision=precision, fp8_scales=fp8_scales).modules_served()
            except EngineError as e:
                raise UsageError(str(e)) from None
        bundle = None
        # every network from engines: configs and tokenizers, no torch module (the IP-Adapter's check reads the
        # UNet's layers: with it the UNet is built on the meta device instead)
        if served >= set(COMPONENTS) and ip_image is None:
            from ..core.engine_bundle import engines_bundle

            bundle = engines_bundle(args.model, args.model_path, args.random_weights, weights_seed, args.allow_pickle)
        if bundle is None:
            bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle,
                                seed=weights_seed, skip=served)
        torch_side = [n for n in component_modules(bundle) if n not in bundle.skipped]
        print(f"model loaded in {time.perf_counter() - t_load:.1f} s (weights in torch: "
              f"{', '.join(torch_side) or 'none'}; engines run the rest)")
    else:
        bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle, device, dtype,
                            seed=weights_seed)
        print(f"model loaded in {time.perf_counter() - t_load:.1f} s")
    load_s = time.perf_counter() - t_load
    if loras:
        from ..core.lora import LoraError, check_loras, fuse_loras

        try:  # with --engines the bundle keeps the base weights the engines were built from; they are swapped
            check_loras(bundle, loras) if args.engines else fuse_loras(bundle, loras)
        except LoraError as e:
            raise UsageError(str(e)) from None
        print("lora: " + ", ".join(f"{spec.path} x{spec.scale:g}" for spec in loras))
    warn_truncated_prompts("mf-generate", bundle.tokenizers,
                           {"--prompt": args.prompt, "--negative-prompt": args.negative_prompt})
    vae = vae_dtype(family, bundle.vae.config, dtype, args.vae_dtype, device)  # the loaded VAE's config decides

    compile_cache = None
    static_scales = None if args.engines else _static_scales(args, bundle, fp8_policy, plan, dilation, opts, device,
                                                             mode)
    if args.engines:
        from ..engine.cache import EngineError
        from ..engine.load import open_engines

        phases: dict[str, float] = {}
        try:
            # With --controlnet (--ip-adapter) the controlled-UNet (unet_ip) engines run every UNet step: the plain
            # ones stay closed.
            nets, desc = open_engines(args.engines, bundle, plan, dilation, args.relay, device, precision=precision,
                                      timings=phases,
                                      unopened=frozenset({"unet"} if controls or ip_image is not None else ()),
                                      fp8_scales=fp8_scales)
        except EngineError as e:
            raise UsageError(str(e)) from None
        print(f"engines: {desc} (weights checked in {phases['fingerprint']:.2f} s, files verified in "
              f"{phases['verify']:.2f} s, opened in {phases['open']:.1f} s)")
        print(phase_line(started_s, load_s, phases))
        print(start_line(run_age, estimate_s, started_s))
        if loras:
            _swap_loras(nets, bundle, loras, plan, dilation, args.engines, device)
    elif mode in ("compiled", "fast-graphs"):
        from ..engine.torch_fast import FastOptions, FastTorchNetworks, fast_graphs_options, inductor_set

        fp8 = fp8_policy
        if mode == "compiled":
            fast = FastOptions(inductor_options=inductor_set(args.inductor or "default"), unet_fp8=fp8)
        else:
            fast = fast_graphs_options(device, fp8)
        nets = FastTorchNetworks(bundle, fast, vae_dtype=vae, fp8_scales=static_scales)
        if mode == "compiled":
            t_warm = time.perf_counter()
            compile_cache = warm_start(args, nets, device, plan, opts.relay, opts.guidance > 1.0)
            # the engines' phases, the compile cache's load as `open`: cold_start_phases.py reads compiled runs too
            print(phase_line(started_s, load_s, {"fingerprint": 0.0, "verify": 0.0,
                                                 "open": time.perf_counter() - t_warm}))
            print(start_line(run_age, estimate_s, started_s))
    else:
        if fp8_policy is not None:
            from ..engine.fp8 import quantize_unet

            quantize_unet(bundle.unet, fp8_policy)
            if static_scales is not None:
                static_scales(bundle)
        nets = TorchNetworks(bundle, vae)
    if args.precision == "fp8" and not args.engines:  # engines: the build said so, and `desc` says fp8
        from ..engine.fp8 import Fp8Linear

        n = sum(isinstance(m, Fp8Linear) for m in bundle.unet.modules())
        print(f"precision fp8: {n} UNet projections as FP8 (e4m3) GEMMs, the rest bf16")
    if mode != "eager" and not nets.capturable:  # declared by the backend, never assumed
        from ..engine.backend import get_backend

        why = f"{nets.backend} engines cannot run inside the runtime's CUDA graphs: {get_backend(nets.backend).capture_note}"
        if args.mode:
            raise UsageError(f"--mode {mode}: {why}; use --mode eager")
        print(f"{why}; running the stages eagerly")
        mode = "eager"
    if tiling is not None:
        from ..runtime.vae_tiling import TiledVaeNetworks

        nets = TiledVaeNetworks(nets, bundle.vae, tiling)
        print(f"VAE tiled: passes larger than {tiling.tile}x{tiling.tile} pixels run in tiles"
              + (", waiting tiles parked in host memory" if tiling.park else ""))
    if ip_image is not None and args.engines:
        from .conditions import ip_adapter_engines

        nets, encoder = ip_adapter_engines(nets, bundle, plan, args, ip_image, dilation, device)
        print(f"ip-adapter: {args.ip_adapter} x{args.ip_adapter_scale:g}, image {args.ip_adapter_image} (unet_ip "
              f"{nets.backend} engines; {encoder})")
    elif ip_image is not None:
        from ..runtime.ipadapter import (IPAdapterError, IPAdapterNetworks, encode_ip_image, load_image_encoder,
                                         load_ip_adapter, read_ip_adapter)

        try:
            state = read_ip_adapter(args.ip_adapter, bundle.unet)
            encoder, processor = load_image_encoder(args.ip_adapter_encoder, device, nets.unet_dtype)
        except IPAdapterError as e:
            raise UsageError(str(e)) from None
        load_ip_adapter(bundle.unet, state, args.ip_adapter_scale)
        nets = IPAdapterNetworks(nets, encode_ip_image(encoder, processor, ip_image, device))
        del encoder  # the embeddings are all the stages need
        print(f"ip-adapter: {args.ip_adapter} x{args.ip_adapter_scale:g}, image {args.ip_adapter_image}")
    if controls:
        from .conditions import controlled_networks

        nets = controlled_networks(nets, bundle, plan, controls, args.engines, dilation, device)
        print("controlnet: " + ", ".join(f"{c[0]} x{c[2]:g} over {c[3]:g}..{c[4]:g}" for c in controls))
    if mode == "eager":
        pipe = MegaFusionPipeline(bundle, nets, device)
    else:
        pipe = MegaFusionPipeline.fast(bundle, nets, device)
    # One image per process: the text encoders go after the prompt, each stage's graphs after the stage (#15's 16 GiB)
    pipe.one_shot = True
    print(f"mode {mode}" + (" (the first run compiles: minutes on real-size models)" if mode == "compiled" else ""))

    print(f"model {family.name} ({bundle.source}) on {device}, UNet {str(nets.unet_dtype).removeprefix('torch.')}, "
          f"VAE {str(nets.vae_dtype).removeprefix('torch.')}")
    print(f"plan: {plan.describe()}")
    steps = plan.total_steps - (image_start.entry(plan).global_step if image_start else 0)
    result = generate_with_progress(pipe, plan, opts, steps, image_start, not args.no_progress)
    if args.engines or mode == "compiled":  # what the first image spent where (benchmarks/cold_start.py reads it)
        from ..benchmarks.cold_start import first_image_line

        graphs = pipe.graphs
        print(first_image_line(result.timings, graphs.captures if graphs else 0,
                               graphs.capture_seconds if graphs else 0.0))
        if mode == "compiled":
            finish_compiled(nets, compile_cache)
    png_s = finish_generation(result, out, segments_printed=not args.no_progress)
    if args.engines or mode == "compiled":  # the image is on disk: what is left of the process is its exit
        from ..benchmarks.cold_start import process_age, saved_line

        print(saved_line(png_s, process_age()))
    return 0


def _check_memory(args, family, plan, opts, device, dtype, tile=("auto", None), mode="eager"):
    """The plan's estimated peak memory (runtime/memory_plan.py) against --max-memory or the device's memory, before
    any load, choosing the VAE tiling; with --dry-run also prints the plan, the estimate and the cost, and returns
    True (nothing else to do); else the VaeTiling to run with, or None (untiled)."""
    from ..core.memory import GiB
    from .common import apply_memory_cap, memory_budget, vae_dtype

    limit, what = memory_budget(args.max_memory, device)
    vae = vae_dtype(family, family.vae, dtype, args.vae_dtype, device)  # the loaded VAE's config may still differ
    from ..runtime.memory_cache import EstimateCache, default_path
    from ..runtime.memory_plan import plan_memory

    cache = EstimateCache(default_path(args.engines))  # a repeated start reads the estimate rather than recompute it
    memory = plan_memory(family, plan, dtype, vae, int(limit), opts.guidance > 1.0, opts.relay, *tile,
                         graph_pool=mode != "eager", cache=cache)
    estimate, tiling = memory.estimate, memory.tiling
    if args.dry_run:
        from ..benchmarks.flops import MetaCostCounter, plan_cost

        cost = plan_cost(MetaCostCounter(family), plan, cfg=opts.guidance > 1.0, relay=opts.relay)
        print(f"plan: {plan.describe()}")
        print(f"memory estimates: {cache.reused} reused, {cache.computed} computed ({cache.path})")
        print("\n".join(memory.describe()))
        print(f"  limit: {what}, {limit / GiB:.2f} GiB; the estimate leaves out allocator slack, cuDNN workspaces "
              "and compile-time autotuning")
        print(f"cost: {cost.true_tflop:,.1f} TFLOP (UNet {cost.unet_tflop:,.1f}), text encoders apart")
        return True
    if estimate.peak_bytes > limit:
        parts = estimate.describe()[0].split(": ", 1)[1]  # weights [+ graph pool] + the worst segment
        raise UsageError(f"plan {plan.describe()} needs an estimated {estimate.peak_bytes / GiB:.1f} GiB "
                         f"({parts}), more than {what} ({limit / GiB:.2f} GiB)"
                         + (f" with the VAE in {tiling.tile}-pixel tiles" if tiling else "")
                         + (" parked in host memory" if tiling and tiling.park else "")
                         + "; ask for a smaller --size, a 16-bit --vae-dtype or --relay latent"
                         + (", or leave out --no-vae-tile" if tile[0] == "off" else ""))
    apply_memory_cap(args.max_memory, device)
    return tiling


def one_shot_allocator(args, device) -> bool:
    """mf-generate on CUDA (one image a process): PyTorch's allocator in expandable segments unless the user set
    PYTORCH_CUDA_ALLOC_CONF, so each stage's freed graph pool goes back whole to the next stage, the relay and the
    decode. H200, SDXL 2048 from --weights-apart packages (benchmarks/RESULTS.md, twelfth session): device peak of the
    whole process 15.9 GiB (#15's 16 GiB); the torch modes' peak with it is not measured yet. Returns whether it was
    set (--max-memory sets it on its own)."""
    from .common import expandable_segments

    if device.type != "cuda" or args.max_memory is not None or not expandable_segments():
        return False
    print("allocator: expandable segments (one image a process; PYTORCH_CUDA_ALLOC_CONF chooses otherwise)")
    return True


def _swap_loras(nets, bundle, loras, plan, dilation, engine_dir, device) -> None:
    """--lora with --engines: the LoRAs' weights put into the opened engines (engine/lora_swap.py), or refused."""
    from ..engine.cache import EngineError
    from ..engine.lora_swap import LoraSwap, swap_rebuild_command

    precision = next(r.spec.precision for (network, _), r in nets.runners.items() if network == "unet")
    rebuild = swap_rebuild_command(bundle, plan, nets.backend, precision, dilation, Path(engine_dir), device)
    try:
        report = LoraSwap(nets, bundle, rebuild).swap(loras)
    except EngineError as e:
        raise UsageError(str(e)) from None
    print(f"lora swapped into {report.engines} {nets.backend} engines ({report.tensors} tensors) in "
          f"{report.seconds:.2f} s, without recompiling")


def _static_scales(args, bundle, policy, plan, dilation, opts, device, mode):
    """With --fp8-scales static: the callable that sets the quantized UNet's input scales (loaded from the
    compile cache's folder under --mode compiled, else calibrated in this process), printing where they came from;
    else None. The weights fingerprint is taken now, before the UNet is changed for speed."""
    from ..engine.compile_cache import default_root
    from ..engine.fp8_scales import ScaleStore
    from ..runtime.fp8_calibration import static_scales_provider

    keep = mode == "compiled" and not args.no_compile_cache
    store = ScaleStore(args.compile_cache or default_root()) if keep else None
    return static_scales_provider(bundle, policy, plan, dilation, opts.guidance > 1.0, device, store)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("mf-generate", lambda: run(args))


def console_main() -> None:
    """`mf-generate` and `python -m megafusion.cli.generate`: one image, then the process ends at once (exit_now)."""
    from .common import exit_now

    exit_now(main())


if __name__ == "__main__":
    console_main()
