"""`mf-build-engines --model sd3|flux|tiny-sd3|tiny-flux --backend aoti|onnxruntime`: the transformer engines of a
stage plan (engine/dit_engines.py, engine/dit_onnx_engines.py), for `mf-generate --model sd3|flux --engines DIR`.

aoti: one static AOTInductor package per stage shape; onnxruntime: one dynamic ONNX engine whose profile covers the
plan's range of sides. Both at the transformer batch the generation will run: SD3's CFG batch of 2 unless
`--guidance` is at most 1, FLUX's one pass. aoti also packages the text encoders and the VAE (per stage shape,
engine/flow_aux_engines.py) for libmegafusion; mf-generate runs those from the torch modules.
"""
from __future__ import annotations

import argparse

from .common import UsageError


def run_dit_build(args: argparse.Namespace, family) -> int:
    """Checks every flag before loading anything, then builds."""
    from ..engine.backend import get_backend
    from ..engine.dit_engines import dit_engine_kinds
    from .common import (DTYPES, check_backend, output_folder_from_args, parse_guidance, plan_from_args,
                         resolve_device, weights_seed_from_args)

    name = family.name
    for flag, value in (("--vae-precision", args.vae_precision), ("--ort-optimize", args.ort_optimize),
                        ("--dilation", args.dilation), ("--seed", args.seed),
                        ("--stages-2", args.stages_2), ("--stage-2-path", args.stage_2_path)):
        if value is not None:
            raise UsageError(f"{flag} does not apply to {name} (transformer packages only)")
    if args.dynamic or args.jobs != 1 or args.no_dilation:
        raise UsageError(f"--dynamic, --jobs and --no-dilation do not apply to {name}")
    kinds = dit_engine_kinds()
    if args.backend not in kinds:
        raise UsageError(f"--backend {args.backend}: {name} engines are built by {' or '.join(kinds)} "
                         "(mf-generate --mode graphs|compiled runs the torch modules)")
    if args.precision not in DTYPES:
        raise UsageError(f"--precision {args.precision}: {name} packages are {', '.join(DTYPES)}")
    backend = get_backend(args.backend)
    if args.precision not in backend.precisions:  # declared by the backend (ONNX Runtime: no bf16 kernels)
        raise UsageError(f"--precision {args.precision}: {backend.name} builds {name} engines in "
                         f"{', '.join(backend.precisions)}")
    from .flow_controlnet_engines import build_flow_controlnets, check_controlnet_build_args

    check_controlnet_build_args(args, family, kinds[args.backend])
    groups = dit_network_groups(args.networks, args.backend, name)
    weights_seed = weights_seed_from_args("mf-build-engines", family, args, takes_dit=True)
    guidance = parse_guidance(args.guidance if args.guidance is not None else str(family.default_guidance))
    batch = 2 if family.cfg and guidance > 1.0 else 1
    plan = plan_from_args(family, args.size, args.stages)
    out = output_folder_from_args("--output", args.output)
    device = str(resolve_device(args.device))
    check_backend(args.backend, device)
    from ..core.dit_lora import check_dit_lora_file
    from ..core.lora import LoraError
    from .conditions import loras_from_args

    loras = loras_from_args(args.lora)
    if loras and not kinds[args.backend].takes_lora:
        raise UsageError(f"--lora: {args.backend} {name} engines take no LoRA yet; build with --backend aoti")
    try:  # another family's LoRA is refused before the load
        for spec in loras:
            check_dit_lora_file(spec, family)
    except LoraError as e:
        raise UsageError(str(e)) from None
    print(f"plan: {plan.describe()}; transformer batch {batch}")

    from ..core.loading import load_model

    # On the engines' device and in their precision, as mf-generate --engines loads it (random weights are drawn
    # where they live, and the weights fingerprint hashes them as loaded).
    bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle, device,
                        DTYPES[args.precision], seed=weights_seed)
    if loras:
        from ..core.lora import fuse_loras

        try:  # the engines' key hashes the fused weights: mf-generate --lora finds them by the same fuse
            fuse_loras(bundle, loras)
        except LoraError as e:
            raise UsageError(str(e)) from None
        print("lora: " + ", ".join(f"{spec.path} x{spec.scale:g}" for spec in loras))
    built = 0
    if "transformer" in groups:
        built = kinds[args.backend].build(bundle, plan, args.precision, out, batch, device, args.force,
                                          log=lambda msg: print(msg, flush=True))
    if args.controlnet:  # the ControlNets' packages and the controlled transformer's, beside the plain ones
        build_flow_controlnets(args, bundle, plan, args.precision, out, batch, device)
    aux = tuple(g for g in groups if g != "transformer")
    if aux:  # aoti: text encoders and VAE too, what libmegafusion runs beside the transformer
        from ..engine.flow_aux_engines import build_flow_aux_engines

        n = build_flow_aux_engines(bundle, plan, args.precision, out, device, args.force, groups=aux,
                                   log=lambda msg: print(msg, flush=True))
        print(f"text encoder and VAE packages: {n} built")
    print(f"{built} built; manifest {out / 'manifest.json'}")
    return 0


DIT_NETWORK_GROUPS = ("transformer", "text_encoders", "vae")
"""What `--networks` selects for the transformer families (default: all three with aoti, the transformer else)."""


def dit_network_groups(value: str | None, backend: str, name: str) -> tuple[str, ...]:
    """The groups `--networks` names, checked; UsageError naming a bad one."""
    if value is None:
        return DIT_NETWORK_GROUPS if backend == "aoti" else ("transformer",)
    groups = tuple(n.strip() for n in value.split(",") if n.strip())
    for g in groups or (value,):
        if g not in DIT_NETWORK_GROUPS:
            raise UsageError(f"--networks {g!r}: {name} builds {', '.join(DIT_NETWORK_GROUPS)}")
    if backend != "aoti" and set(groups) - {"transformer"}:
        raise UsageError(f"--networks {value}: {backend} builds the {name} transformer only (text encoder and VAE "
                         "packages: --backend aoti)")
    return groups
