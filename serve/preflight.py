"""The checks of `mf-serve`'s flags that need the device or the model's shapes, run in the driver before Ray starts:
--precision fp8 on this machine's GPU, and each --lora, --controlnet and --ip-adapter against the model's
architecture, read from a copy of the model built on the meta device (no weights: seconds, not the load); with
--engines, the entries every served size needs, with --controlnet its controlnet and unet_controlled entries, and
with --ip-adapter its unet_ip entries (by the weights' origin, nothing opened).

A refusal is a `ConfigError` naming the flag and the value, as serve/config.py's; mf-serve prints one line and
exits 2. The replicas run the same checks again when they load (a cluster's nodes may differ from the driver).
"""
from __future__ import annotations

from .config import ConfigError, ServeConfig

CONTROLNET_FIELDS = ("block_out_channels", "cross_attention_dim", "addition_embed_type", "in_channels")
"""The ControlNet config fields that must equal the UNet's (runtime/controlnet.py `load_controlnet` compares them)."""


def check_fp8(cfg: ServeConfig) -> None:
    """--precision fp8 where mf-generate takes it: a CUDA GPU with FP8 tensor cores (engine/fp8.py), or the CPU for
    FP8 engines. A driver without CUDA deploying onto a cluster (--address) leaves the check to the replicas."""
    if cfg.precision != "fp8":
        return
    import torch

    from ..engine.fp8 import fp8_unavailable

    if cfg.device == "cuda" and not torch.cuda.is_available():
        return
    if cfg.engines is not None and cfg.device == "cpu":  # FP8 packages run on the CPU too, as in mf-generate
        return
    why = fp8_unavailable(torch.device(cfg.device), "--precision fp8")
    if why:
        raise ConfigError(why)


def check_against_model(cfg: ServeConfig) -> None:
    """Each --lora, --controlnet and --ip-adapter checked against the model's layers (meta device, no weights)."""
    if not (cfg.loras or cfg.controlnets or cfg.ip_adapter):
        return
    from ..core.loading import COMPONENTS, WeightsError, load_model

    try:
        bundle = load_model(cfg.model, cfg.model_path, cfg.random_weights, skip=frozenset(COMPONENTS))
    except WeightsError as e:
        raise ConfigError(f"--model-path {cfg.model_path!r}: {e}") from None
    if cfg.loras:
        from ..core.lora import LoraError, check_loras, parse_lora

        try:
            check_loras(bundle, [parse_lora(v) for v in cfg.loras])
        except LoraError as e:
            raise ConfigError(str(e)) from None
    configs = [check_controlnet(path, bundle.unet.config) for path in cfg.controlnets]
    if configs and cfg.engines is not None:
        check_control_engines(cfg, bundle, configs)
    if cfg.ip_adapter:
        from ..runtime.ipadapter import IPAdapterError, read_ip_adapter

        try:
            state = read_ip_adapter(cfg.ip_adapter, bundle.unet)
        except IPAdapterError as e:
            raise ConfigError(str(e)) from None
        if cfg.engines is not None:
            check_ip_engines(cfg, bundle, state)


def check_served_engines(cfg: ServeConfig, family) -> None:
    """--engines: the folder covers every --sizes entry's default plan (dilation 2, pixel relay) in the precision
    the replicas open, chosen by the weights' origin (nothing loaded, as SD3 / FLUX's `choose_served_engines`);
    else one line naming the size, what is missing and the mf-build-engines command, before Ray starts rather than
    as a replica that does not start."""
    from ..engine.cache import EngineError

    for w, h in cfg.served_sizes:
        try:
            cfg.served_selection(family, w, h)
        except EngineError as e:
            raise ConfigError(f"--engines {cfg.engines!r}, --sizes {w}x{h}: {e}") from None


def check_control_engines(cfg: ServeConfig, bundle, configs: list[dict]) -> None:
    """--engines --controlnet: the folder holds controlnet and unet_controlled entries for every --sizes entry's
    default plan (dilation 2, the plain engines' backend and precision), as the warm-up opens them, the controlnet
    entries built from each ControlNet folder's files; else one line naming the size, what is missing and the
    mf-build-engines command. `configs`: each ControlNet's, as `check_controlnet` read it."""
    from ..core.plan import default_plan
    from ..engine.cache import EngineError
    from ..engine.controlnet_engines import check_controlnet_engines
    from ..engine.fingerprint import folder_fingerprints

    weights = folder_fingerprints(cfg.engines, cfg.controlnets)  # once for every size
    for w, h in cfg.served_sizes:
        try:
            sel = cfg.served_selection(bundle.family, w, h)
            check_controlnet_engines(cfg.engines, bundle, default_plan(bundle.family, w, h), configs, cfg.controlnets,
                                     weights, sel.backend.name, sel.precision, 2, cfg.device)
        except EngineError as e:
            raise ConfigError(f"--sizes {w}x{h}: {e}") from None


def check_ip_engines(cfg: ServeConfig, bundle, state: dict) -> None:
    """--engines --ip-adapter: the folder holds unet_ip entries of this file and scale for every --sizes entry's
    default plan (dilation 2, pixel relay, the plain engines' backend and precision), and the encoder projects to the
    IP-Adapter's width; else one line naming what is missing and the mf-build-engines command."""
    from transformers import CLIPVisionConfig

    from ..core.plan import default_plan
    from ..engine.cache import EngineError
    from ..engine.ipadapter_engines import check_ip_engines as check, embed_dim

    dim = embed_dim(state)
    try:
        got = int(CLIPVisionConfig.from_pretrained(cfg.ip_adapter_encoder).projection_dim)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--ip-adapter-encoder {cfg.ip_adapter_encoder!r}: cannot be read "
                          f"({str(e).splitlines()[0]})") from None
    if got != dim:
        raise ConfigError(f"--ip-adapter-encoder {cfg.ip_adapter_encoder!r}: projects to {got} features; the "
                          f"IP-Adapter {cfg.ip_adapter!r} takes {dim}")
    for w, h in cfg.served_sizes:
        plan = default_plan(bundle.family, w, h)
        try:
            sel = cfg.served_selection(bundle.family, w, h)
            check(cfg.engines, bundle, plan, dim, cfg.ip_adapter, cfg.engines_ip_scale, sel.backend.name,
                  sel.precision, 2, cfg.device)
        except EngineError as e:
            raise ConfigError(f"--sizes {w}x{h}: {e}") from None


def check_controlnet(path: str, unet_config) -> dict:
    """A ControlNet folder's config, checked against the UNet's (another architecture is refused by name)."""
    from diffusers import ControlNetModel

    try:
        theirs = ControlNetModel.load_config(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--controlnet {path!r}: cannot be read ({str(e).splitlines()[0]})") from None
    for field in CONTROLNET_FIELDS:
        a, b = theirs.get(field), unet_config.get(field)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise ConfigError(f"--controlnet {path!r}: {field} {a} does not match the UNet's {b} (a ControlNet "
                              "for another architecture)")
    return theirs


def preflight(cfg: ServeConfig) -> ServeConfig:
    """Every check above; returns `cfg` unchanged. SD3 / FLUX: their flags were checked by file
    (serve/flow_config.py; the replicas check them against the loaded model), and --engines must serve every size."""
    from ..core.dit_families import is_dit
    from ..core.loading import resolve_family

    family = resolve_family(cfg.model, cfg.model_path)
    if is_dit(family):
        if cfg.engines is not None:
            from .flow_config import choose_served_engines

            choose_served_engines(cfg, family)
        return cfg
    check_fp8(cfg)
    if cfg.engines is not None:
        check_served_engines(cfg, family)
    check_against_model(cfg)
    return cfg
