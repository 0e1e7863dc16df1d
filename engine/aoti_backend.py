"""AOTInductor backend: runs the `.pt2` packages that `mf-build-engines --backend aoti` writes
(export/aoti_export.py), loaded with `torch._inductor.aoti_load_package`; nothing is compiled at start-up.

A package serves a range of sizes (its entry's one `ShapeProfile`). The compiled code checks lower bounds
only, so the runner refuses a shape outside the range itself, naming the range, instead of running it.
"""
from __future__ import annotations

import os

import torch

from megafusion.export.aoti_export import describe_range
from megafusion.export.models import get_family
from megafusion.export.specs import NetworkSpec, ShapeProfile


def version() -> str:
    """Packages are only valid for the torch that compiled them."""
    return torch.__version__


class AotiRunner:
    """One compiled package: named inputs in spec order, outputs by the spec's names."""

    def __init__(self, path: str | os.PathLike, spec: NetworkSpec, profile: ShapeProfile, model: str,
                 device: torch.device | str = "cpu"):
        self.spec, self.profile = spec, profile
        self.device = torch.device(device)
        self.family = get_family(model)
        self.model = torch._inductor.aoti_load_package(str(path))

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
