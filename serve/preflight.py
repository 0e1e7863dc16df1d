"""The checks of `mf-serve`'s flags that need the device or the model's shapes, run in the driver before Ray starts:
--precision fp8 on this machine's GPU, and each --lora, --controlnet and --ip-adapter against the model's
architecture, read from a copy of the model built on the meta device (no weights: seconds, not the load).

A refusal is a `ConfigError` naming the flag and the value, as serve/config.py's; mf-serve prints one line and
exits 2. The replicas run the same checks again when they load (a cluster's nodes may differ from the driver).
"""
from __future__ import annotations

from .config import ConfigError, ServeConfig

CONTROLNET_FIELDS = ("block_out_channels", "cross_attention_dim", "addition_embed_type", "in_channels")
"""The ControlNet config fields that must equal the UNet's (runtime/controlnet.py `load_controlnet` compares them)."""


def check_fp8(cfg: ServeConfig) -> None:
    """--precision fp8 where mf-generate takes it: a CUDA GPU with FP8 tensor cores (engine/fp8.py). A driver
    without CUDA deploying onto a cluster (--address) leaves the check to the replicas."""
    if cfg.precision != "fp8":
        return
    import torch

    from ..engine.fp8 import fp8_unavailable

    if cfg.device == "cuda" and not torch.cuda.is_available():
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
    for path in cfg.controlnets:
        check_controlnet(path, bundle.unet.config)
    if cfg.ip_adapter:
        from ..runtime.ipadapter import IPAdapterError, read_ip_adapter

        try:
            read_ip_adapter(cfg.ip_adapter, bundle.unet)
        except IPAdapterError as e:
            raise ConfigError(str(e)) from None


def check_controlnet(path: str, unet_config) -> None:
    """A ControlNet folder's config against the UNet's (another architecture is refused by name)."""
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
    check_against_model(cfg)
    return cfg
