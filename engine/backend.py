"""One interface for every engine backend, and the registry that build, load and the CLIs iterate over.

A backend says what it is (name, version, precisions, whether its profiles are one per stage shape or one
range), whether it can run here, how it builds one network into a staging folder, how it opens a built entry
as a `Runner`, and whether that runner may be captured inside the runtime's CUDA graphs. Adding a backend is
its own module plus one line in `_BUILTIN`; nothing else branches on backend names.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.families import ModelFamily
from ..core.plan import StagePlan
from ..core.specs import FP8, PRECISIONS, NetworkSpec, Requirement, ShapeProfile, profile_sizes

if TYPE_CHECKING:
    from ..core.loading import ModelBundle
    from ..export.onnx_export import ExportResult
    from .cache import Entry
    from .runners import Runner

Log = Callable[[str], None]

STAGE_PROFILES, RANGE_PROFILE = "stage", "range"
"""How a backend's engines cover shapes: one profile per plan stage shape, or one range of sides."""


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine or device; the message says what is missing."""


class WeightSwapError(RuntimeError):
    """An opened engine cannot take other weights without a rebuild; the message names the engine and why."""


@dataclass(frozen=True)
class BuildJob:
    """One network to build: what a backend's `build` reads."""

    bundle: ModelBundle
    """The model; `bundle.module_for(spec.network)` is the module to export."""
    requirement: Requirement
    """The network spec and the profiles (as `Backend.profiles` gave them) the engine must serve."""
    device: str
    """Device the engine is for (and exported on)."""
    output: Path
    """The engine folder (a backend may keep shared files there, e.g. TensorRT's timing cache)."""
    ort_optimize: str = "none"
    """ONNX Runtime graph fusion target (`none`, `cpu`, `cuda`); only the onnxruntime backend takes another
    value than `none`."""
    check_load: bool = True
    """Open the built engine once before it is committed (where the backend can do so cheaply)."""
    weights_apart: bool = False
    """aoti: the package without its weights, written beside it (`BuildRequest.weights_apart`)."""
    fp8_calibrate: Callable | None = None
    """An FP8 UNet with static input scales: sets them on the quantized copy before export
    (`BuildRequest.fp8_calibrate`); None: per-token scales."""


@dataclass(frozen=True)
class BuildOutput:
    """What a backend's build reports besides the files it wrote."""

    exported: ExportResult | None = None
    """The export (its time apart from the rest of the build, its files), if there was one."""
    fused: dict[str, int] | None = None
    """Fused ops by type, for ORT-optimized models."""


@dataclass(frozen=True)
class OpenContext:
    """What opening an entry needs besides the entry itself."""

    family: ModelFamily
    """The model family the entry was built for."""
    device: torch.device
    """Device to run on."""
    bundle: ModelBundle | None = None
    """The loaded model: the torch backend runs its modules."""
    ort_conv_algo_search: str = "EXHAUSTIVE"
    """ONNX Runtime CUDA EP: cuDNN convolution algorithm search."""
    ort_unet_graphs: bool = False
    """ONNX Runtime CUDA EP: capture one ORT CUDA graph per UNet input shape (inside the session)."""


@dataclass(frozen=True)
class NetworkExport:
    """One network's export in each file format a backend builds, the module, spec and shapes bound by the caller
    (ControlNet, controlled UNet, IP UNet, image encoder, IF UNet); `Backend.export` picks one."""

    aoti: Callable[[Path, Callable], object]
    """(package path, kernel context) -> ExportResult: a static AOTInductor package."""
    onnx: Callable[[Path], object]
    """(model path) -> ExportResult: an ONNX model."""


class Backend:
    """Base class of the backends; each subclass is one registered instance."""

    name: str = ""
    """What `--backend` and the engine key say."""
    precisions: tuple[str, ...] = PRECISIONS
    """Network precisions it builds."""
    vae_precisions: tuple[str, ...] = PRECISIONS
    """VAE precisions it builds (bf16 where the backend runs it)."""
    profile_kind: str = STAGE_PROFILES
    """`stage`: one profile per plan stage shape; `range`: one profile over the plan's range of sides."""
    preference: dict[str, int] = {}
    """Rank per device type when a folder holds several backends (lower is preferred); absent: last."""
    capture_note: str = ""
    """Why its runners cannot be captured in the runtime's CUDA graphs ('' when they can; each runner declares
    the same as its `capturable`)."""
    weights_apart: bool = False
    """Whether `mf-build-engines --weights-apart` applies: engines that read their weights from one file of their
    entry, which every shape and dilation of a network shares at run time."""
    one_engine_per_shape: bool = False
    """Whether each engine is compiled for one input shape (a static package, chosen by shape at run time) rather
    than one engine serving all of a requirement's profiles."""
    dynamic_option: bool = False
    """Whether `mf-build-engines --dynamic` applies: one engine per network over the plan's range of sides
    instead of static engines per stage shape."""
    runs_modules: bool = False
    """Whether its runners run the loaded torch modules (so a run must load their weights); other backends' engines
    hold the weights themselves, and a run from them builds those modules without weights."""
    swap_note: str = "its engines hold their weights in a form megafusion cannot replace"
    """Why its built engines cannot take other weights (a LoRA) without a rebuild; '' when `swap_weights` can."""

    def version(self) -> str:
        """Version of the library that builds and runs the engines (part of the engine key)."""
        raise NotImplementedError

    def check_available(self, device: str) -> None:
        """Raises BackendUnavailable, saying what is missing, if engines cannot be built or run on `device`."""

    def check_request(self, precision: str, ort_optimize: str, device: str, dynamic: bool = False) -> None:
        """ValueError naming the value if a build option does not fit this backend."""
        if dynamic and not self.dynamic_option:
            raise ValueError(f"--dynamic applies to the aoti backend only; {self.name} engines already serve "
                             f"their profiles' ranges")
        if precision not in self.precisions:
            raise ValueError(f"backend {self.name} builds {', '.join(self.precisions)}, not {precision!r}")
        if precision == FP8 and torch.device(device).type == "cuda":
            # The CPU runs `_scaled_mm` without tensor cores (the tiny models' tests); a GPU needs FP8 ones.
            from .fp8 import fp8_unavailable

            why = fp8_unavailable(device, "--precision fp8")
            if why:
                raise ValueError(why)
        if ort_optimize != "none":
            raise ValueError(f"ORT optimization {ort_optimize!r} applies to the onnxruntime backend only, "
                             f"not {self.name!r}")

    def default_ort_optimize(self, device: str) -> str:
        """The ONNX Runtime fusion target a build uses unless told otherwise."""
        return "none"

    def rebuild_args(self, ort_optimize: str) -> list[str]:
        """The build options of this backend a rebuild command names besides model, plan and precision."""
        return []

    def profiles(self, family: ModelFamily, r: Requirement, plan: StagePlan,
                 dynamic: bool = False) -> tuple[ShapeProfile, ...]:
        """The profiles an engine of `r` is built for (the key records them)."""
        return r.profiles

    def requirements(self, family: ModelFamily, r: Requirement, plan: StagePlan,
                     dynamic: bool = False) -> tuple[Requirement, ...]:
        """The engines that serve `r`: one over all its profiles unless a backend builds one per shape."""
        return (Requirement(r.spec, self.profiles(family, r, plan, dynamic)),)

    def served_sizes(self, family: ModelFamily, spec: NetworkSpec, profiles: tuple[ShapeProfile, ...]) -> list[str]:
        """The pixel sizes an entry serves, for messages ('' entries for fixed-shape networks are left out)."""
        return profile_sizes(spec.network, profiles, family.vae_scale)

    def build(self, job: BuildJob, staging: Path, log: Log) -> BuildOutput:
        """Writes the engine's files into `staging` (committed by the cache afterwards)."""
        raise NotImplementedError

    def export(self, how: NetworkExport, staging: Path, device: str):
        """Writes `how`'s export in this backend's format into `staging` (an entry's files); ExportResult."""
        raise BackendUnavailable(f"backend {self.name} builds no ControlNet, IP-Adapter, image encoder or IF engines")

    def open(self, entry: Entry, path: Path | None, spec: NetworkSpec, ctx: OpenContext) -> Runner:
        """A runner for a verified entry; `path` is its first file (None for a backend without files)."""
        raise NotImplementedError

    def open_file(self, path: Path, spec: NetworkSpec, device: torch.device) -> Runner:
        """A runner for the file `export` wrote, opened without an entry's context (the IF UNets: no latent family);
        it checks no profile, the caller picks it by shape."""
        raise BackendUnavailable(f"backend {self.name} opens no ControlNet, IP-Adapter, image encoder or IF engines")

    def swap_weights(self, runner: Runner, module: torch.nn.Module, prefix: str,
                     weights: dict[str, torch.Tensor]) -> int:
        """Puts `weights` into an opened engine in place of those it was built with, without recompiling; returns
        how many of its tensors changed. `weights` are named as `module`'s parameters (`module` is the loaded
        model the engine was built from, holding the built weights; `prefix` is its name in the exported wrapper)
        and held in its dtype. WeightSwapError says why an engine cannot take them. Only for backends whose
        `swap_note` is ''."""
        raise WeightSwapError(f"{self.name} {self.swap_note}")


_BUILTIN = (
    "onnxruntime_backend",
    "tensorrt_backend",
    "torch_backend",
    "aoti_backend",
)
"""Modules that each define `BACKEND`, in the order `--backend` lists them; imported on first use."""

_registry: dict[str, Backend] | None = None


def registry() -> dict[str, Backend]:
    """Every backend by name (their libraries are imported only when a backend is used)."""
    global _registry
    if _registry is None:
        found = [importlib.import_module(f"{__package__}.{m}").BACKEND for m in _BUILTIN]
        _registry = {b.name: b for b in found}
    return _registry


def apart_backends() -> str:
    """The backends `--weights-apart` applies to, named for messages."""
    return " or ".join(name for name, b in registry().items() if b.weights_apart)


def backend_names() -> tuple[str, ...]:
    return tuple(registry())


def get_backend(name: str) -> Backend:
    """The backend called `name`; ValueError naming it and the choices otherwise."""
    try:
        return registry()[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(registry())}") from None
