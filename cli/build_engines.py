"""`mf-build-engines`: export and build the engines a MegaFusion stage plan needs."""
from __future__ import annotations

import argparse
import sys

from ..engine.backend import apart_backends, backend_names, get_backend
from .common import ArgumentParser, UsageError, add_model_arguments, check_backend, run_main


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="mf-build-engines",
        description="Export a model's networks to ONNX and build engines for every shape of a stage plan.",
    )
    add_model_arguments(p, None)
    # The seed of random weights was `--seed` here, while mf-generate's --seed is the noise seed: refused with a
    # pointer to --weights-seed rather than silently given another meaning.
    p.add_argument("--seed", help=argparse.SUPPRESS)
    p.add_argument("--size", help="output WIDTHxHEIGHT of the default plan (default: 2x native per side)")
    p.add_argument("--stages", help="explicit plan, e.g. 1024x1024:40,2048x2048:10 (WIDTHxHEIGHT:STEPS)")
    p.add_argument("--backend", choices=backend_names(), default="onnxruntime",
                   help="engine backend (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "fp16", "fp8", "bf16"), default="fp32",
                   help="UNet and text encoder precision (default: %(default)s); fp8 (aoti, SD1.5 and SDXL): the "
                        "UNets' transformer projections as FP8 (e4m3) GEMMs and the rest of them in bf16, the text "
                        "encoders and VAE as for fp16; a CUDA device needs FP8 tensor cores (compute capability 8.9 "
                        "or newer); run them with mf-generate --engines DIR --precision fp8")
    p.add_argument("--vae-precision", choices=("fp32", "fp16", "bf16"),
                   help="default: --precision, except SDXL's VAE (overflows in fp16) under fp16: bf16 for a CUDA "
                        "device where the backend builds it (aoti, torch), else fp32")
    p.add_argument("--dilation", type=int, metavar="D",
                   help="mid-block dilation at stages after the first, 1 to 8 (default: 2, the paper's)")
    p.add_argument("--no-dilation", action="store_true", help="build no dilated UNet")
    p.add_argument("--device", default="auto", help="cpu or cuda[:N]: what the engines are for (default: cuda if present)")
    p.add_argument("--ort-optimize", choices=("none", "cpu", "cuda"),
                   help="onnxruntime: fuse attention (and, for cuda, GroupNorm, NhwcConv, ...) with ONNX Runtime's "
                        "transformer optimizer for this execution provider; needed for 2048 px on the CUDA EP "
                        "(default: cuda with a CUDA --device, else none)")
    p.add_argument("--networks",
                   help="comma-separated networks to build (default: all the plan needs): text_encoder, "
                        "text_encoder_2, unet, unet-standard, unet-dilated, vae_decoder, vae_encoder (sd3/flux: "
                        "transformer, text_encoders, vae); builds of disjoint sets may run at once into one --output")
    p.add_argument("--dynamic", action="store_true",
                   help="aoti: one package per network over the plan's range of sides (serves other sizes in the "
                        "range, slower) instead of one static package per network and stage shape")
    p.add_argument("--weights-apart", action="store_true",
                   help="aoti: packages without their weights, kept in each entry's weights.safetensors; a run "
                        "reads them once and the standard and dilated UNets share one copy (faster start, 4.9 GB "
                        "less GPU memory for SDXL); Python and libmegafusion both open them")
    p.add_argument("--fp8-scales", choices=("token", "static"), default="token",
                   help="with --precision fp8: the UNet packages' input scales, one per token computed at run time "
                        "(default) or one per layer fixed in each stage shape's package by calibration runs at that "
                        "shape (static; run them with mf-generate --precision fp8 --fp8-scales static)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="build the plan's networks in N processes at once, as many as this machine's free RAM "
                        "holds (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild entries even if present and valid")
    p.add_argument("--no-warm-up", action="store_true",
                   help="CUDA: skip the one mf-generate run from the new folder that ends a build (it checks the "
                        "engines end to end and leaves the driver's and cuDNN's first-use work done on this machine)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="build from the weights with this LoRA fused (repeatable); engines built from the base weights "
                        "take LoRAs without a rebuild instead: mf-generate --engines DIR --lora PATH[:SCALE]")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="also build this diffusers ControlNetModel's engines and the UNet that takes its residuals "
                        "(aoti or onnxruntime; repeatable: each ControlNet its own entries); sd3/flux: an "
                        "SD3ControlNetModel / FluxControlNetModel and the transformer that takes its block samples "
                        "(aoti)")
    from .conditions import add_ip_build_arguments

    add_ip_build_arguments(p)
    p.add_argument("--output", required=True, help="engine folder, created if missing (required)")
    # DeepFloyd IF (--model tiny-if or if): the second cascade stage (cli/build_engines_if.py).
    p.add_argument("--stages-2", metavar="PLAN", help="IF only: stage II's plan (--stages is stage I's)")
    p.add_argument("--stage-2-path", metavar="DIR", help="IF only: the IFSuperResolutionPipeline folder")
    # SD3 / FLUX (--model sd3, flux, tiny-sd3, tiny-flux): transformer packages (cli/build_engines_dit.py).
    p.add_argument("--guidance", help="SD3/FLUX only: the --guidance mf-generate will run with; SD3 packages take "
                   "the CFG batch of 2 when it is above 1 (default: the family's); bf16 precision is for these only")
    return p


def ort_optimize_level(asked: str | None, backend: str, device: str) -> str:
    """The `--ort-optimize` value to build with: as asked (checked against backend and device by the backend's own
    rule), else the backend's default for the device."""
    if asked is None:
        return get_backend(backend).default_ort_optimize(device)
    try:
        get_backend(backend).check_request("fp32", asked, device)
    except ValueError as e:
        raise UsageError(f"--ort-optimize {asked}: {e}") from None
    return asked


def _networks(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise UsageError(f"--networks {value!r}: name at least one network")
    return names


def _default_groups(selectors: dict[str, set[str]]) -> tuple[str, ...]:
    """What --jobs spreads over processes: each UNet variant alone (the long builds), every other network alone."""
    unets = tuple(sorted(k for k in selectors if k.startswith("unet-")))
    return unets + tuple(sorted(k for k in selectors if not k.startswith("unet")))


def run(args: argparse.Namespace) -> int:
    from ..core.families import FAMILIES, pixel_family_names

    fam = FAMILIES.get(args.model)
    if args.weights_apart and fam is not None and fam.kind not in ("sd15", "sdxl"):
        raise UsageError(f"--weights-apart: applies to SD1.5 and SDXL models only, not {args.model}")
    unet_family = args.model not in pixel_family_names() and (fam is None or fam.kind in ("sd15", "sdxl"))
    if args.ip_adapter and not unet_family:
        raise UsageError(f"--ip-adapter: {args.model} has no IP-Adapter engines (SD1.5 and SDXL models only)")
    if args.model in pixel_family_names():
        from .build_engines_if import run_if_build

        if args.controlnet:
            raise UsageError(f"--controlnet: {args.model} has no ControlNet engines (SD1.5, SDXL, SD3 and FLUX models only)")
        return run_if_build(args)
    from ..core.dit_families import DIT_FAMILIES

    if args.model in DIT_FAMILIES:
        from .build_engines_dit import run_dit_build

        return run_dit_build(args, DIT_FAMILIES[args.model])
    if args.stages_2 is not None or args.stage_2_path is not None:
        raise UsageError("--stages-2 and --stage-2-path apply to IF models (tiny-if, if) only")
    if args.guidance is not None or args.precision == "bf16":
        raise UsageError(f"{'--guidance' if args.guidance is not None else '--precision bf16'} applies to the "
                         "transformer families (sd3, flux) only")
    from .common import (dilation_from_args, output_folder_from_args, plan_from_args, resolve_device,
                     weights_seed_from_args)
    from ..core.loading import load_model
    from ..core.loading import resolve_family

    from ..engine.build import BuildRequest, build_engines

    family = resolve_family(args.model, args.model_path)  # a local folder's config gives the native size
    # Every check of the user's input comes before the model load and the exports.
    if args.seed is not None:
        raise UsageError(f"--seed {args.seed}: the seed of random weights is --weights-seed (--weights-seed "
                         f"{args.seed}), as in mf-generate and mf-bench, whose --seed is the noise seed")
    if args.precision == "fp8" and (args.controlnet or args.ip_adapter):
        raise UsageError(f"--precision fp8 with {'--controlnet' if args.controlnet else '--ip-adapter'}: FP8 "
                         "packages are built for the plain UNet only; build these at fp16")
    if args.fp8_scales == "static" and args.precision != "fp8":
        raise UsageError(f"--fp8-scales static needs --precision fp8, not --precision {args.precision}")
    if args.fp8_scales == "static" and args.dynamic:
        raise UsageError("--fp8-scales static with --dynamic: static scales are calibrated per stage shape, one "
                         "package each; leave out --dynamic")
    weights_seed = weights_seed_from_args("mf-build-engines", family, args)
    dilation = dilation_from_args(args.dilation, args.no_dilation)
    plan = plan_from_args(family, args.size, args.stages)
    out = output_folder_from_args("--output", args.output)
    device = str(resolve_device(args.device))
    check_backend(args.backend, device)
    try:  # the backend's precisions (and for fp8 the GPU's FP8 tensor cores), before the model load
        get_backend(args.backend).check_request(args.precision, "none", device)
    except ValueError as e:
        raise UsageError(f"--precision {args.precision}: {e}") from None
    ort_optimize = ort_optimize_level(args.ort_optimize, args.backend, device)
    if args.dynamic:
        try:
            get_backend(args.backend).check_request("fp32", "none", device, dynamic=True)
        except ValueError as e:
            raise UsageError(f"--dynamic: {e}") from None
    if args.weights_apart and not get_backend(args.backend).weights_apart:
        raise UsageError(f"--weights-apart: applies to {apart_backends()} engines only, not {args.backend}")
    vae_choices = get_backend(args.backend).vae_precisions
    if args.vae_precision is not None and args.vae_precision not in vae_choices:
        raise UsageError(f"--vae-precision {args.vae_precision}: backend {args.backend} builds VAEs in "
                         f"{', '.join(vae_choices)}")
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    networks = _networks(args.networks)
    from .conditions import controlnet_build_args

    # --networks may name ControlNet networks (engine/controlnet_engines.py CONTROL_SELECTORS): split off here.
    networks, control_networks = controlnet_build_args(args.controlnet, args.backend, args.dynamic, args.jobs,
                                                       networks)
    from .conditions import ip_build_args

    networks, ip_networks = ip_build_args(args, args.backend, args.dynamic, args.jobs, networks)
    from .conditions import loras_from_args

    loras = loras_from_args(args.lora)
    from ..core.specs import plan_requirements

    from ..engine.build import network_selectors, select_networks

    reqs = plan_requirements(family, plan, args.precision, dilation, args.vae_precision)
    if networks:  # checked before the (minutes-long, for SDXL) model load
        try:
            select_networks(reqs, networks)
        except ValueError as e:
            raise UsageError(f"--networks: {e}") from None
    print(f"plan: {plan.describe()}")
    if args.jobs > 1:
        from .parallel_build import build_in_parallel

        worst = build_in_parallel(sys.argv[1:] if args.argv is None else args.argv, family, plan,
                                  networks or _default_groups(network_selectors(reqs)), args.jobs)
        if worst == 0 and not networks:
            keep_memory_estimates(family, plan, args.precision, args.vae_precision, device, out)
            compile_relay_kernel(device)
            warm_up(args, device, out)
        return worst
    bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle, seed=weights_seed)
    if loras:
        from ..core.lora import LoraError, fuse_loras

        try:
            fuse_loras(bundle, loras)  # the key's weights fingerprint then hashes the fused weights
        except LoraError as e:
            raise UsageError(str(e)) from None
    req = BuildRequest(plan, args.backend, args.precision, out, args.vae_precision,
                       dilation, device, args.force,
                       release_weights=True,  # the bundle is not used after the build: let it shrink as it goes
                       ort_optimize=ort_optimize, dynamic=args.dynamic, networks=networks,
                       weights_apart=args.weights_apart, fp8_scales=args.fp8_scales,
                       fp8_calibrate=_fp8_calibrate(args, bundle),
                       remember_hashes=True)  # the first run from the folder then reads no engine file to verify it
    if args.controlnet:  # before build_engines, which releases the UNet's weights as it goes
        from .conditions import build_controlnets

        build_controlnets(bundle, args.controlnet, req, control_networks, bool(control_networks and not networks))
    if args.ip_adapter:  # before build_engines too; the bundle's UNet stays as loaded
        from .conditions import build_ip_adapter

        build_ip_adapter(bundle, args, req, ip_networks)
    if (control_networks or ip_networks) and not networks:  # --networks named only these
        return 0
    report = build_engines(bundle, req, log=lambda msg: print(msg, flush=True))
    print(f"{len(report.built)} built, {len(report.skipped)} up to date; manifest {out / 'manifest.json'}")
    if not (networks or control_networks or ip_networks):  # a --networks part: a child of a parallel build, or a top-up
        keep_memory_estimates(family, plan, args.precision, args.vae_precision, device, out)
        compile_relay_kernel(device)
        warm_up(args, device, out)
    return 0


def _fp8_calibrate(args: argparse.Namespace, bundle):
    """--fp8-scales static: the calibration each FP8 UNet package gets at its shape (the recipe's prompt encoded
    now, before the build frees the text encoders); else None."""
    if args.fp8_scales != "static":
        return None
    from ..runtime.fp8_calibration import package_calibrator

    return package_calibrator(bundle)


def warm_up_command(args: argparse.Namespace, device: str, out) -> list[str]:
    """The mf-generate command line that runs the built plan once from `out` (the build's model, plan, dtypes)."""
    cmd = [sys.executable, "-m", "megafusion.cli.generate", "--model", args.model, "--engines", str(out),
           "--device", device, "--prompt", "warm-up", "--no-progress"]
    for flag, value in (("--model-path", args.model_path), ("--size", args.size), ("--stages", args.stages),
                        ("--dilation", args.dilation), ("--dtype", args.precision if args.precision != "fp8" else None),
                        ("--precision", "fp8" if args.precision == "fp8" else None), ("--vae-dtype", args.vae_precision),
                        ("--fp8-scales", "static" if args.fp8_scales == "static" else None)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.random_weights:
        cmd += ["--random-weights", "--weights-seed", str(args.weights_seed)]
    return cmd + (["--no-dilation"] if args.no_dilation else []) + (["--allow-pickle"] if args.allow_pickle else [])


def warm_up(args: argparse.Namespace, device: str, out) -> None:
    """On CUDA, one mf-generate run from the new folder, image discarded: it checks the engines end to end, and a
    fresh machine's first process after the build no longer pays the first-use work that outlives a process (on
    the H200 the first process after an SDXL 2048 build took 21.9 s to its image, the next 14.5 s: graph captures
    6.8 against 3.1 s, relays 3.9 against 1.4 s). A failure is reported, not fatal: the engines are built."""
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    import torch

    if args.no_warm_up or torch.device(device).type != "cuda":
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = warm_up_command(args, device, out) + ["--output", str(Path(tmp) / "warm-up.png")]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            ok, tail = done.returncode == 0, (done.stderr or done.stdout).strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            ok, tail = False, ["timed out after 900 s"]
    took = time.perf_counter() - t0
    print(f"warm-up run from {out}: {'done' if ok else 'failed'} in {took:.1f} s"
          + ("" if ok else f" ({tail[0] if tail else 'no output'}); run it yourself: {' '.join(cmd[2:])}"))


def compile_relay_kernel(device: str) -> None:
    """On CUDA, compiles the fused relay kernel (runtime/fused_relay.py, NVRTC) into its on-disk cache now, on the
    machine that will run the engines: otherwise a fresh machine's first relay compiles it (the H200's first
    process there spent 4.6 s in its relays against 1.5 s in the next one)."""
    import time

    import torch

    if torch.device(device).type != "cuda":
        return
    from ..runtime import fused_relay

    if not fused_relay.nvrtc_available():
        print("relay kernel: NVRTC (cuda-python) not available: relays will run torch's resize")
        return
    t0 = time.perf_counter()
    fused_relay.load(torch.device(device))
    print(f"relay kernel ready in {fused_relay.cache_dir()} ({time.perf_counter() - t0:.1f} s)")


def keep_memory_estimates(family, plan, precision: str, vae_precision: str | None, device: str, out) -> None:
    """Computes the plan's memory estimates as `mf-generate --engines OUT` asks for them by default (pixel relay,
    CFG, untiled, with and without the CUDA-graph pool), into OUT's memory-estimates.json
    (runtime/memory_cache.py): a fresh machine's first run then reads them instead of spending about 13 s (SDXL
    2048, measured on the H200's host) on the meta-device estimate. Another relay, guidance or tiling is computed
    and kept by the first run that asks for it."""
    import time

    import torch

    from ..runtime.memory_cache import EstimateCache, default_path
    from ..runtime.memory_plan import plan_memory
    from ..core.memory import device_memory
    from .common import DTYPES, model_dtype, vae_dtype

    t0 = time.perf_counter()
    dev = torch.device(device)
    unet = torch.bfloat16 if precision == "fp8" else model_dtype(dev, precision if precision in DTYPES else None)
    vae = vae_dtype(family, family.vae, unet, vae_precision, dev)
    limit, _ = device_memory(dev)
    cache = EstimateCache(default_path(out))
    for graph_pool in (True, False) if dev.type == "cuda" else (False,):  # graphs mode, eager mode
        plan_memory(family, plan, unet, vae, int(limit), True, "pixel", graph_pool=graph_pool, cache=cache)
    print(f"memory estimates for mf-generate: {cache.computed} computed, {cache.reused} already kept, in "
          f"{cache.path} ({time.perf_counter() - t0:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv  # --jobs re-runs this command line in child processes
    from ..export.onnx_export import ExportError

    from ..engine.cache import EngineError

    return run_main("mf-build-engines", lambda: run(args), fatal=(EngineError, ExportError))


if __name__ == "__main__":
    sys.exit(main())
