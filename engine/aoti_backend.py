"""AOTInductor backend: runs the `.pt2` packages that `mf-build-engines --backend aoti` writes
(export/aoti_export.py), loaded with `torch._inductor.aoti_load_package`; nothing is compiled at start-up.

A package serves a range of sizes (its entry's one `ShapeProfile`). The compiled code checks lower bounds
only, so the runner refuses a shape outside the range itself, naming the range, instead of running it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.families import ModelFamily, get_family
from ..core.plan import StagePlan
from ..core.specs import NetworkSpec, Requirement, ShapeProfile, describe_range, range_profile
from .backend import RANGE_PROFILE, Backend, BuildJob, BuildOutput, Log, OpenContext


def version() -> str:
    """Packages are only valid for the torch that compiled them."""
    return torch.__version__


def _libtorch_global() -> None:
    """Makes libtorch's symbols visible to libraries loaded later, as they are in a C++ program.

    A package's wrapper.so does not link libtorch itself (`ldd`: libtorch.so not found); it expects the shim
    functions to be there already. Python loads torch's libraries without RTLD_GLOBAL, and with torch 2.11 (CUDA
    packages) loading a package then crashed the process (SIGSEGV inside wrapper.so, even for the SDXL text
    encoder), while libmegafusion ran the same packages, and Python did too after
    `sys.setdlopenflags(RTLD_GLOBAL | RTLD_NOW)` before `import torch`. Reopening the loaded libraries with
    RTLD_GLOBAL does the same without touching the interpreter's flags."""
    import ctypes

    lib = Path(torch.__file__).parent / "lib"
    for name in ("libc10.so", "libtorch_cpu.so", "libtorch.so", "libc10_cuda.so", "libtorch_cuda.so"):
        if (lib / name).exists():
            ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)


def load_package(path: str | os.PathLike, device: torch.device):
    """The package's model, loaded on `device` (see `_libtorch_global`)."""
    _libtorch_global()
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else -1)
    # Single-threaded runs: no locking or stream synchronization inside run(), so a CUDA graph can capture it
    # (the runtime's graphed denoise step); a runner is used from one thread at a time.
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=index)


class AotiRunner:
    """One compiled package: named inputs in spec order, outputs by the spec's names."""

    def __init__(self, path: str | os.PathLike, spec: NetworkSpec, profile: ShapeProfile, model: str,
                 device: torch.device | str = "cpu"):
        self.spec, self.profile = spec, profile
        self.device = torch.device(device)
        self.family = get_family(model)
        self.model = load_package(path, self.device)
        self.capturable = True  # loaded single-threaded: see load_package

    def _check(self, inputs: dict[str, torch.Tensor]) -> None:
        for name, lo, _, hi in self.profile.shapes:
            shape = tuple(inputs[name].shape)
            if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                covered = describe_range(self.family, self.spec, self.profile) or f"{lo} to {hi}"
                raise ValueError(f"{self.spec.name}: input {name} of shape {shape} is outside the compiled "
                                 f"range ({covered}, shapes {lo} to {hi})")

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check(inputs)
        out = self.model(*(inputs[t.name] for t in self.spec.inputs))
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return {t.name: y for t, y in zip(self.spec.outputs, outs)}


class AotiBackend(Backend):
    """AOTInductor packages (`.pt2`): compiled ahead of time, loaded without compiling, one range of sides each."""

    name = "aoti"
    profile_kind = RANGE_PROFILE
    preference = {"cuda": 2, "cpu": 1}

    def version(self) -> str:
        return version()

    def profiles(self, family: ModelFamily, r: Requirement, plan: StagePlan) -> tuple[ShapeProfile, ...]:
        return (range_profile(family, r.spec, plan),)  # one package serves the plan's whole range of sides

    def served_sizes(self, family: ModelFamily, spec: NetworkSpec, profiles: tuple[ShapeProfile, ...]) -> list[str]:
        return [d for p in profiles if (d := describe_range(family, spec, p))]  # none for fixed shapes

    def build(self, job: BuildJob, staging, log: Log) -> BuildOutput:
        from ..export.aoti_export import export_aoti

        r = job.requirement
        res = export_aoti(job.bundle, r.spec, r.profiles[0], staging / "model.pt2", device=job.device)
        log(f"    exported and compiled with AOTInductor in {res.seconds:.1f} s")
        return BuildOutput(res)

    def open(self, entry, path, spec: NetworkSpec, ctx: OpenContext) -> AotiRunner:
        return AotiRunner(path, spec, entry.key.profiles[0], entry.key.model, ctx.device)


BACKEND = AotiBackend()
