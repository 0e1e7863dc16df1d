"""`mf-serve`'s flags for SD3 and FLUX (the flow-matching transformer families), checked as `mf-generate` checks
them for these families (cli/generate_flow.py), before Ray starts. No model load.

What the flow runtime has and serves: image to image, ControlNet (torch), IP-Adapter (FLUX: CLIP vision encoder;
SD3: SigLIP), LoRA (fused; with --engines swapped by engines that take one) and transformer engines
(engine/dit_engines.py). With --engines and --controlnet, plain requests
run from the transformer engines and controlled ones from the aoti ControlNet and controlled-transformer packages
(engine/dit_controlnet_engines.py), both checked for every served size before Ray starts. What it does not:
--precision fp8. Each refusal is a ConfigError naming the flag and the value.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ConfigError, ServeConfig

if TYPE_CHECKING:
    import torch


def dit_precision(device: str) -> str:
    """The transformer's precision as mf-generate picks it: bf16 on CUDA (SD3.5 and FLUX ship in bf16, T5 overflows
    fp16), fp32 on the CPU."""
    return "bf16" if device == "cuda" else "fp32"


def dit_mode(cfg: ServeConfig) -> str:
    """How the flow pipeline runs: the flag; else eager on the CPU or with an IP-Adapter (its image and scale change
    per request, which a captured graph would not see), graphs on CUDA."""
    if cfg.mode is not None:
        return cfg.mode
    return "eager" if cfg.device != "cuda" or cfg.ip_adapter else "graphs"


def cfg_batch(family) -> int:
    """The transformer batch at the family's default guidance: SD3's CFG batch of 2; FLUX's one pass."""
    return 2 if family.cfg and family.default_guidance > 1.0 else 1


def check_dit_flags(cfg: ServeConfig, family) -> None:
    """The flags the flow runtime refuses or checks by file (run after serve/config.py's generic checks)."""
    from ..core.dit_lora import check_dit_lora_file
    from ..core.lora import LoraError, parse_lora
    from ..runtime.controlnet import ControlInputError
    from ..runtime.flow_controlnet import check_flow_controlnet_folder

    name = family.name
    if cfg.precision is not None:
        raise ConfigError(f"--precision {cfg.precision}: mf-serve does not run it for {name} yet (mf-generate does; "
                          "the serving loop quantizes the UNet families only)")
    try:
        for value in cfg.loras:
            check_dit_lora_file(parse_lora(value), family)
    except LoraError as e:
        raise ConfigError(str(e)) from None
    try:
        for path in cfg.controlnets:
            check_flow_controlnet_folder(path, family)
    except ControlInputError as e:
        raise ConfigError(str(e)) from None
    if cfg.controlnets and cfg.engines is not None and cfg.loras:  # as the UNet server refuses it
        raise ConfigError("--lora with --engines and --controlnet: the controlled-transformer packages hold the "
                          "weights they were built from; build them with the LoRA (mf-build-engines --lora ... "
                          "--controlnet ...) and leave out --lora here")
    if cfg.ip_adapter is not None and cfg.engines is not None:  # mf-build-engines builds none for these families
        raise ConfigError(f"--ip-adapter with --engines: {name} has no IP-Adapter engines; the IP-Adapter runs on "
                          "the torch path only (leave out --engines)")
    if cfg.ip_adapter is not None and family.kind == "sd3":
        from ..runtime.flow_ipadapter_sd3 import check_sd3_ip_adapter_file, check_siglip_folder
        from ..runtime.ipadapter import IPAdapterError

        try:
            check_sd3_ip_adapter_file(cfg.ip_adapter)
            check_siglip_folder(cfg.ip_adapter_encoder)
        except IPAdapterError as e:
            raise ConfigError(str(e)) from None


def choose_served_engines(cfg: ServeConfig, family):
    """With --engines: the kind of transformer engines that serves every --sizes entry's default plan at the default
    guidance (engine/dit_engines.py `choose_dit_engines`), checked before any load; ConfigError naming what the
    folder lacks and the build command. Also refuses --lora on engines that take none."""
    from ..core.plan import default_plan
    from ..engine.cache import EngineError
    from ..engine.dit_controlnet_engines import dit_folder_weights
    from ..engine.dit_engines import choose_dit_engines

    kind = None
    controlnets = dit_folder_weights(cfg.engines, family, cfg.controlnets)  # once for every size
    for w, h in cfg.served_sizes:
        try:
            kind, _ = choose_dit_engines(cfg.engines, family, default_plan(family, w, h), cfg.device,
                                         dit_precision(cfg.device), cfg_batch(family), cfg.device == "cuda")
        except EngineError as e:
            raise ConfigError(f"--engines {cfg.engines!r}: {e}") from None
        if cfg.controlnets:
            check_served_control_engines(cfg, family, default_plan(family, w, h), controlnets=controlnets)
    if cfg.loras and not kind.takes_lora:
        raise ConfigError(f"--lora with --engines: {kind.backend} transformer engines take no LoRA yet; build aoti "
                          f"packages (mf-build-engines --model {family.name} --backend aoti ...) and use those")
    return kind


def check_served_control_engines(cfg: ServeConfig, family, plan, batch: int | None = None,
                                 controlnets: tuple = ()) -> None:
    """--engines with --controlnet: the folder holds a controlled-transformer package for every stage shape of
    `plan` at the transformer batch (default: the default guidance's) and a package of each of `controlnets`
    ((folder, fingerprint): `dit_folder_weights`; a replica opening a plan passes none, as the open checks them by
    the loaded nets), else an EngineError naming the build command (as mf-generate --engines --controlnet checks
    it)."""
    from ..engine.cache import EngineError
    from ..engine.dit_controlnet_engines import check_dit_controlnet_engines, dit_controlnet_build_command

    batch = cfg_batch(family) if batch is None else batch
    precision = dit_precision(cfg.device)
    command = dit_controlnet_build_command(family, cfg.weights_source(family), plan, precision, cfg.engines,
                                           cfg.device, batch, cfg.controlnets)
    try:
        check_dit_controlnet_engines(cfg.engines, family, plan, cfg.device, precision, batch, command, controlnets)
    except EngineError as e:
        raise ConfigError(f"--engines {cfg.engines!r} with --controlnet: {e}") from None


def check_served_memory(cfg: ServeConfig, family, device: torch.device, dtype: torch.dtype) -> None:
    """Before a replica loads: each served size's default plan, estimated as mf-generate estimates it
    (runtime/flow_memory.py: the torch transformer, VAE and text encoders every replica loads, SD3's CFG batch of
    2), against the replica's device memory. A size that cannot fit is a ConfigError naming it, not an out-of-memory
    error after minutes of loading. ControlNets, IP-Adapters and engines add to the estimate, so this refuses only
    what cannot fit even without them."""
    from ..core.memory import GiB, device_memory
    from ..core.plan import default_plan
    from ..runtime.flow_memory import estimate_flow_memory, meta_networks

    total, what = device_memory(device)
    nets = meta_networks(family, dtype)  # one meta model for every size: building it is most of an estimate
    for w, h in cfg.served_sizes:
        plan = default_plan(family, w, h)
        est = estimate_flow_memory(family, plan, dtype, None, cfg=True, graph_pool=dit_mode(cfg) != "eager",
                                   networks=nets)
        if est.peak_bytes > total:
            raise ConfigError(f"--sizes {w}x{h}: {family.name}'s plan {plan.describe()} needs an estimated "
                              f"{est.peak_bytes / GiB:.1f} GiB ({est.describe()[0].split(': ', 1)[1]}), more than "
                              f"{what} ({total / GiB:.1f} GiB); serve smaller sizes, or on a device with more memory")
