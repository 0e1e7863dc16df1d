"""What a server is started with (`mf-serve`'s flags), checked before anything starts. No Ray, no torch.

Each refusal is a `ConfigError` naming the flag and the value; `mf-serve` prints it as one line, status 2,
before Ray starts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.families import UnknownModelError, get_family
from ..core.loading import resolve_family
from ..core.plan import PlanError, default_plan, parse_size

MODES = ("eager", "graphs", "compiled")
DEVICES = ("cpu", "cuda")


class ConfigError(ValueError):
    """A flag the server cannot start with; the text names the flag and the value."""


@dataclass(frozen=True)
class ServeConfig:
    """One server: the model and how it runs, the sizes it serves, and its limits."""

    model: str
    """`sd15`, `sdxl`, `sd3`, `flux` or a tiny one (`tiny-sd15`, `tiny-sdxl`, `tiny-sd3`, `tiny-flux`)."""
    model_path: str | None = None
    """A local diffusers folder (every node of the cluster must have it at this path)."""
    random_weights: bool = False
    """The real architecture with random weights (seed 0, as mf-generate builds them)."""
    engines: str | None = None
    """Run from the engines `mf-build-engines` built in this folder (instead of the torch modules)."""
    mode: str | None = None
    """eager, graphs or compiled (None: graphs on CUDA, eager on CPU; with engines, graphs where they can be
    captured)."""
    device: str = "cpu"
    """`cpu` or `cuda` (each replica gets one GPU; `cuda` inside a replica is that GPU)."""
    sizes: tuple[tuple[int, int], ...] = ()
    """Output sizes (width, height) served and warmed up at start; () means the model's default output size."""
    replicas: int = 1
    """Model replicas (one GPU each on CUDA)."""
    max_batch: int = 4
    """Most requests one replica takes into one batch (@serve.batch)."""
    max_queue: int = 16
    """Requests waiting for a replica beyond those running; more are answered 429."""
    timeout_s: float = 300.0
    """A request not answered within this many seconds is answered 504 and its work cancelled."""
    host: str = "127.0.0.1"
    """HTTP host the proxy listens on (0.0.0.0 for every interface)."""
    port: int = 8000
    """HTTP port."""
    batch_wait_s: float = 0.05
    """How long a replica waits for more requests to fill a batch once it has one."""
    log_level: str = field(default="INFO")
    """Serve's log level for the replicas."""
    loras: tuple[str, ...] = ()
    """`--lora PATH[:SCALE]` values: fused into the weights at start (with engines: swapped into them)."""
    precision: str | None = None
    """None (the device's dtype) or `fp8` (the UNet's projections as FP8 GEMMs, as mf-generate --precision fp8; with
    --engines, the folder's FP8 packages)."""
    fp8_scales: str = "token"
    """With --precision fp8: the FP8 layers' input scales, per token (`token`) or static (`static`): with --engines
    the folder's packages of mf-build-engines --fp8-scales static, on the torch modules calibrated at start over
    the served sizes' default plans (kept with the compile cache under --mode compiled)."""
    controlnets: tuple[str, ...] = ()
    """ControlNet folders, loaded at start; a request gives one control image each (`control_images`)."""
    ip_adapter: str | None = None
    """An IP-Adapter file, loaded at start; a request may give `ip_adapter_image`."""
    ip_adapter_encoder: str | None = None
    """The IP-Adapter's CLIP vision model folder."""
    ip_adapter_scale: float | None = None
    """With --engines: the scale baked into the unet_ip engines (None: 1.0, mf-build-engines' default); requests
    take no other."""

    compile_cache: str | None = None
    """--mode compiled: the folder that keeps what the replicas compile for the next start (engine/compile_cache.py:
    the compiled functions, Inductor's artifacts and disk cache); None: each node's default folder."""
    no_compile_cache: bool = False
    """--mode compiled: keep nothing; every start compiles (and traces) again."""

    @property
    def engines_precision(self) -> str | None:
        """The precision of the UNet engines to open: fp8 when asked for, else the device's choice among those
        built (FP8 ones only when asked for)."""
        return "fp8" if self.precision == "fp8" else None

    @property
    def engines_ip_scale(self) -> float | None:
        """The one IP-Adapter scale requests may ask for: the engines' (None on the torch path: any)."""
        if self.engines is None or self.ip_adapter is None:
            return None
        return 1.0 if self.ip_adapter_scale is None else float(self.ip_adapter_scale)

    @property
    def served_sizes(self) -> tuple[tuple[int, int], ...]:
        if self.sizes:
            return self.sizes
        plan = default_plan(resolve_family(self.model, self.model_path))
        return ((plan.output_width, plan.output_height),)

    def weights_source(self, family) -> str:
        """The weights' origin as the loader records it (a bundle's `source`), known before the load: what the
        engine folders' build commands name."""
        if self.model_path is not None:
            return str(Path(self.model_path).expanduser())
        return "random:0" if family.tiny or self.random_weights else family.hub_id

    def served_selection(self, family, width: int, height: int):
        """The --engines entries that serve one --sizes entry's default plan (dilation 2, pixel relay) in the
        precision the replicas open, chosen by the weights' origin before any load (engine/load.py
        `select_engines`: an EngineError names what is missing and the build command)."""
        from ..engine.load import select_engines

        return select_engines(self.engines, family, self.weights_source(family), default_plan(family, width, height),
                              2, "pixel", self.device, precision=self.engines_precision, fp8_scales=self.fp8_scales)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ServeConfig:
        d = dict(d)
        d["sizes"] = tuple(tuple(s) for s in d.get("sizes", ()))
        for name in ("loras", "controlnets"):
            d[name] = tuple(d.get(name, ()))
        return cls(**d)


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`--sizes 1024x1024,2048x2048` -> ((1024, 1024), (2048, 2048)), duplicates dropped."""
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        try:
            wh = parse_size(part)
        except PlanError as e:
            raise ConfigError(f"--sizes {text!r}: {e}") from None
        if wh not in out:
            out.append(wh)
    return tuple(out)


def check_config(cfg: ServeConfig) -> ServeConfig:
    """Refuses what cannot start (naming the flag and the value); returns `cfg` unchanged."""
    try:
        family = get_family(cfg.model)
    except UnknownModelError as e:
        raise ConfigError(str(e)) from None
    if cfg.model_path is not None:
        if cfg.random_weights:
            raise ConfigError("--model-path and --random-weights exclude each other")
        if not Path(cfg.model_path).is_dir() and not Path(cfg.model_path).expanduser().is_dir():
            raise ConfigError(f"--model-path {cfg.model_path!r}: no such folder")
    if cfg.engines is not None:
        if not Path(cfg.engines).is_dir():
            raise ConfigError(f"--engines {cfg.engines!r}: no such folder")
        if cfg.mode is not None:
            raise ConfigError("--engines and --mode exclude each other (engines run captured where they can)")
    if cfg.device not in DEVICES:
        raise ConfigError(f"--device {cfg.device!r}: use one of {', '.join(DEVICES)}")
    if cfg.mode is not None:
        if cfg.mode not in MODES:
            raise ConfigError(f"--mode {cfg.mode!r}: use one of {', '.join(MODES)}")
        if cfg.mode != "eager" and cfg.device != "cuda":
            raise ConfigError(f"--mode {cfg.mode} needs --device cuda (got {cfg.device})")
    if cfg.compile_cache is not None or cfg.no_compile_cache:
        flag = "--compile-cache" if cfg.compile_cache is not None else "--no-compile-cache"
        if cfg.compile_cache is not None and cfg.no_compile_cache:
            raise ConfigError("--compile-cache and --no-compile-cache exclude each other")
        if cfg.mode != "compiled":
            raise ConfigError(f"{flag}: only with --mode compiled (got {'--engines' if cfg.engines else cfg.mode})")
        if cfg.compile_cache is not None and Path(cfg.compile_cache).exists() and not Path(cfg.compile_cache).is_dir():
            raise ConfigError(f"--compile-cache {cfg.compile_cache!r} exists and is not a folder")
    if cfg.model_path is not None:
        from ..core.loading import WeightsError

        try:  # a local folder's config gives the native size the sizes are planned at
            family = resolve_family(cfg.model, cfg.model_path)
        except WeightsError as e:
            raise ConfigError(f"--model-path {cfg.model_path!r}: {e}") from None
    for w, h in cfg.sizes:
        try:
            default_plan(family, w, h)
        except PlanError as e:
            raise ConfigError(f"--sizes {w}x{h}: {e}") from None
    for flag, value in (("--replicas", cfg.replicas), ("--max-batch", cfg.max_batch),
                        ("--max-queue", cfg.max_queue)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} {value}: needs a whole number >= 1")
    if not math.isfinite(cfg.timeout_s) or cfg.timeout_s <= 0:
        raise ConfigError(f"--timeout {cfg.timeout_s}: needs a number of seconds > 0")
    if not 1 <= cfg.port <= 65535:
        raise ConfigError(f"--port {cfg.port}: needs 1 to 65535")
    if not cfg.host:
        raise ConfigError("--host: empty")
    if not math.isfinite(cfg.batch_wait_s) or cfg.batch_wait_s < 0:
        raise ConfigError(f"batch wait {cfg.batch_wait_s}: needs a number of seconds >= 0")
    check_conditions(cfg)
    from ..core.dit_families import is_dit

    if is_dit(family):  # SD3 / FLUX: what the flow runtime refuses or checks by file (serve/flow_config.py)
        from .flow_config import check_dit_flags

        check_dit_flags(cfg, family)
    return cfg


def check_conditions(cfg: ServeConfig) -> None:
    """--lora, --precision, --controlnet, --ip-adapter: the files and the combinations, as mf-generate checks its
    flags (cli/conditions.py); what needs the model's shapes or the device is serve/preflight.py's."""
    from ..core.lora import parse_lora

    for value in cfg.loras:
        spec = parse_lora(value)
        if not spec.path.is_file():
            raise ConfigError(f"--lora {value!r}: no such file {str(spec.path)!r}")
        if not math.isfinite(spec.scale):
            raise ConfigError(f"--lora {value!r}: the scale must be a finite number")
    if cfg.precision not in (None, "fp8"):
        raise ConfigError(f"--precision {cfg.precision!r}: use fp8 (or leave it out)")
    if cfg.fp8_scales not in ("token", "static"):
        raise ConfigError(f"--fp8-scales {cfg.fp8_scales!r}: choose token or static")
    if cfg.fp8_scales == "static" and cfg.precision != "fp8":
        raise ConfigError("--fp8-scales static needs --precision fp8 (with --engines, the folder's packages of "
                          "mf-build-engines --precision fp8 --fp8-scales static)")
    if cfg.precision == "fp8" and cfg.engines is not None:  # as mf-generate refuses it
        from ..engine.fp8 import fp8_engines_conflict

        why = fp8_engines_conflict(bool(cfg.loras), bool(cfg.controlnets), cfg.ip_adapter is not None)
        if why:
            raise ConfigError(why)
    for path in cfg.controlnets:
        if not Path(path, "config.json").is_file():
            raise ConfigError(f"--controlnet {path!r}: not a diffusers ControlNetModel folder (no config.json)")
    if cfg.controlnets and cfg.engines is not None and cfg.loras:  # as mf-generate refuses it
        raise ConfigError("--lora with --engines and --controlnet: the ControlNet engines hold the base UNet; build "
                          "them from the LoRA's weights (mf-build-engines --lora ... --controlnet ...) and leave out "
                          "--lora here")
    if cfg.ip_adapter is None:
        if cfg.ip_adapter_encoder is not None or cfg.ip_adapter_scale is not None:
            flag = "--ip-adapter-encoder" if cfg.ip_adapter_encoder is not None else "--ip-adapter-scale"
            raise ConfigError(f"{flag} needs --ip-adapter")
        return
    if not Path(cfg.ip_adapter).is_file():
        raise ConfigError(f"--ip-adapter {cfg.ip_adapter!r}: no such file")
    if cfg.ip_adapter_encoder is None:
        raise ConfigError("--ip-adapter needs --ip-adapter-encoder DIR")
    if not Path(cfg.ip_adapter_encoder, "config.json").is_file():
        raise ConfigError(f"--ip-adapter-encoder {cfg.ip_adapter_encoder!r}: not a CLIP vision model folder "
                          "(no config.json)")
    if cfg.ip_adapter_scale is not None:
        if cfg.engines is None:
            raise ConfigError(f"--ip-adapter-scale {cfg.ip_adapter_scale}: the scale of --engines' unet_ip engines; "
                              "on the torch path each request gives ip_adapter_scale")
        if not math.isfinite(cfg.ip_adapter_scale):
            raise ConfigError(f"--ip-adapter-scale {cfg.ip_adapter_scale}: must be a finite number")
    if cfg.engines is not None and (cfg.controlnets or cfg.loras):  # as mf-generate refuses it
        raise ConfigError(f"--ip-adapter with --engines and {'--controlnet' if cfg.controlnets else '--lora'}: the "
                          "IP-Adapter engines hold the base UNet alone; leave out --engines (the torch path runs "
                          "both)")
    if cfg.mode not in (None, "eager"):
        raise ConfigError(f"--ip-adapter with --mode {cfg.mode}: the IP-Adapter's image and scale change with each "
                          "request, which a captured graph would not see; the server runs it eager")
