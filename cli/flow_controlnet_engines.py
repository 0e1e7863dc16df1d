"""`--controlnet` with engines for SD3 / FLUX (engine/dit_controlnet_engines.py): what mf-generate and
mf-build-engines add for it. Every check of the user's input comes before the model load; a missing package is one
line with the command that builds it.
"""
from __future__ import annotations

import argparse

from .common import UsageError, weights_source_from_args


def refuse_controlnet_kind(kind, family, command: str) -> None:
    """UsageError unless transformer engines of `kind` (a DiTEngineKind) take ControlNets (declared in the table)."""
    if not kind.takes_controlnet:
        raise UsageError(f"--controlnet with --engines: {kind.backend} transformer engines take no ControlNet; build "
                         f"aoti packages with: {command}")


def check_controlled_engines(args: argparse.Namespace, family, plan, device, precision: str, batch: int,
                             weights_seed: int, loras=()) -> None:
    """mf-generate --engines DIR --controlnet ...: UsageError (the build command in it) unless the folder holds a
    controlled-transformer package for every stage shape; one naming the backend when the folder's transformer
    engines are of a kind that takes no ControlNet."""
    from ..engine.cache import EngineCache, EngineError, device_name
    from ..engine.dit_controlnet_engines import (check_dit_controlnet_engines, dit_controlnet_build_command,
                                                 dit_folder_weights)
    from ..engine.dit_engines import dit_engine_kinds, lora_flags

    source = weights_source_from_args(args, family, weights_seed)
    command = dit_controlnet_build_command(family, source, plan, precision, args.engines, device, batch,
                                           args.controlnet) + lora_flags(loras)
    try:
        check_dit_controlnet_engines(args.engines, family, plan, device, precision, batch, command,
                                     dit_folder_weights(args.engines, family, args.controlnet))
    except EngineError as e:
        kinds = dit_engine_kinds()
        held = {e.key.backend for e in EngineCache(args.engines).entries().values()
                if e.key.model == family.name and e.key.network == "transformer"
                and e.key.device == device_name(device) and e.key.precision == precision}
        for name in sorted(held):
            if name in kinds and not kinds[name].takes_controlnet and "aoti" not in held:
                refuse_controlnet_kind(kinds[name], family, command)
        raise UsageError(str(e)) from None


def controlled_engine_networks(args: argparse.Namespace, base, bundle, controls: list[tuple], plan, device, dtype,
                               precision: str, batch: int):
    """The ControlNets loaded (their weights fingerprint keys their packages) and `base` (torch flow networks: text
    encoders, VAE) with the ControlNets and the controlled transformer run from the packages in --engines."""
    from ..engine.cache import EngineError
    from ..engine.dit_controlnet_engines import open_dit_controlnet_engines
    from ..engine.dit_engines import lora_flags
    from .conditions import loras_from_args
    from ..runtime.controlnet import Control, ControlInputError
    from ..runtime.flow_controlnet import load_flow_controlnet
    from ..runtime.flow_controlnet_engines import EngineControlledFlowNetworks

    try:
        made = [Control(load_flow_controlnet(path, bundle.transformer, bundle.family, device, dtype), image, scale,
                        start, end) for path, image, scale, start, end in controls]
        paths = [c[0] for c in controls]
        nets, transformer = open_dit_controlnet_engines(args.engines, bundle, plan, [c.model for c in made], paths,
                                                        device, precision, batch,
                                                        lora_flags(loras_from_args(args.lora)))
        return EngineControlledFlowNetworks(base, made, device, nets, transformer)
    except (ControlInputError, EngineError) as e:
        raise UsageError(str(e)) from None


def build_flow_controlnets(args: argparse.Namespace, bundle, plan, precision: str, out, batch: int,
                           device: str) -> None:
    """mf-build-engines --model sd3|flux --controlnet DIR...: each ControlNet loaded in the packages' precision on
    their device (checked against the transformer), its packages and the controlled transformer's built."""
    from ..cli.common import DTYPES
    from ..engine.dit_controlnet_engines import build_dit_controlnet_engines
    from ..runtime.controlnet import ControlInputError
    from ..runtime.flow_controlnet import load_flow_controlnet

    try:
        modules = [load_flow_controlnet(p, bundle.transformer, bundle.family, device, DTYPES[precision])
                   for p in args.controlnet]
    except ControlInputError as e:
        raise UsageError(str(e)) from None
    built = build_dit_controlnet_engines(bundle, plan, modules, precision, out, batch, device, args.force,
                                         log=lambda msg: print(msg, flush=True))
    print(f"controlnet: {built} built")


def check_controlnet_build_args(args: argparse.Namespace, family, kind) -> None:
    """mf-build-engines --controlnet for sd3|flux, before the load: the backend takes them, each folder holds the
    family's ControlNet class."""
    from ..runtime.controlnet import ControlInputError
    from ..runtime.flow_controlnet import check_flow_controlnet_folder

    if not args.controlnet:
        return
    if not kind.takes_controlnet:
        raise UsageError(f"--controlnet: {kind.backend} {family.name} engines take no ControlNet; build with "
                         "--backend aoti")
    try:
        for path in args.controlnet:
            check_flow_controlnet_folder(path, family)
    except ControlInputError as e:
        raise UsageError(str(e)) from None
