"""`mf-build-engines --model tiny-if|if`: the UNet engines of a DeepFloyd IF cascade's two plans
(engine/if_engines.py), for `mf-generate --model if --engines DIR`.

`--stages` is stage I's plan, `--stages-2` stage II's (defaults: the paper's); `--backend onnxruntime` or `aoti`.
The T5 encoder runs from the torch module (no engine is built for it).
"""
from __future__ import annotations

import argparse

from .common import UsageError


def run_if_build(args: argparse.Namespace) -> int:
    """Checks every flag before loading anything, then builds."""
    from ..core.if_family import get_if_family
    from ..engine.if_engines import IF_BACKENDS, build_if_engines
    from .common import check_backend, dilation_from_args, output_folder_from_args, resolve_device
    from .generate_if import _if_plan, if_weights_seed

    family = get_if_family(args.model)
    for flag, value in (("--size", args.size), ("--vae-precision", args.vae_precision),
                        ("--ort-optimize", args.ort_optimize), ("--networks", args.networks), ("--seed", args.seed),
                        ("--guidance", args.guidance)):
        if value is not None:
            raise UsageError(f"{flag} does not apply to {family.name} (a pixel-space cascade; UNet engines only)")
    if args.dynamic or args.jobs != 1:
        raise UsageError(f"--dynamic and --jobs do not apply to {family.name}")
    if args.backend not in IF_BACKENDS:
        raise UsageError(f"--backend {args.backend}: {family.name} engines are built by {' or '.join(IF_BACKENDS)}")
    if args.precision not in ("fp32", "fp16"):
        raise UsageError(f"--precision {args.precision}: {family.name} engines are fp32 or fp16")
    weights_seed = if_weights_seed(args, family)
    dilation = dilation_from_args(args.dilation, args.no_dilation)
    plans = {1: _if_plan(family, 1, args.stages, "--stages")}
    if args.model_path is None or args.stage_2_path is not None:
        plans[2] = _if_plan(family, 2, args.stages_2, "--stages-2")
    out = output_folder_from_args("--output", args.output)
    device = str(resolve_device(args.device))
    check_backend(args.backend, device)
    for cascade, plan in plans.items():
        print(f"plan stage {'I' * cascade}: {plan.describe()}")

    from ..core.if_loading import load_if_model

    # Loaded on the engines' device, as mf-generate --engines loads it (random weights are drawn where they live).
    bundle = load_if_model(args.model, args.model_path, args.stage_2_path, device, seed=weights_seed,
                           random_weights=args.random_weights)
    built = build_if_engines(bundle, plans, args.backend, args.precision, out, dilation, device, args.force,
                             log=lambda msg: print(msg, flush=True))
    print(f"{built} built; manifest {out / 'manifest.json'}")
    return 0
