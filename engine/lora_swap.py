"""LoRA weights swapped into opened engines without rebuilding them (docs/ALGORITHM.md §16).

Engines are built from the base weights. `LoraSwap.swap` computes the weights `core.lora.fuse_loras` would leave
in each layer a LoRA changes (`fused_weights`: same float64 update, added in the weight's dtype) and hands them to
the backend's `swap_weights` for every engine of that network (each static shape and dilation): AOTInductor
packages take them as new constants in place, ONNX Runtime sessions are re-created with the changed initializers.
Every swap starts from the base weights, so a later swap (another LoRA, scale 0, none at all) also puts back what
the one before changed. A backend that cannot swap (its `swap_note`) is refused before any work, naming the
backend and the command that builds engines that can.

The swapped networks are marked (`EngineNetworks.weights`) with a fingerprint of what they now hold: sha256 over
the base entry's weights fingerprint and each LoRA file's sha256 and scale, in order
(`engine/fingerprint.lora_fingerprint`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.loading import ModelBundle
from ..core.lora import LoraSpec, fused_weights
from ..core.plan import StagePlan
from ..core.wrappers import wrap
from .backend import WeightSwapError, get_backend
from .cache import EngineError
from .fingerprint import lora_fingerprint
from .load import build_command
from .runners import EngineNetworks, Runner, ShapeDispatch


class SwapRefused(EngineError):
    """These engines cannot take the LoRA's weights; the message names the backend or file, why, and the command
    that builds engines that can."""


@dataclass(frozen=True)
class SwapReport:
    """What one swap did."""

    seconds: float
    """Wall time: reading the LoRA files, computing the fused weights, pushing them into every engine."""
    tensors: int
    """Engine tensors replaced, over all engines (a fused QKV weight counts once per engine)."""
    engines: int
    """Engines (packages, sessions) that took new weights."""
    weights: dict[str, str]
    """The networks' weights fingerprints afterwards (`EngineNetworks.weights`)."""


def engines_of(runner: Runner) -> list[Runner]:
    """The engines behind one network's runner (static packages dispatch by shape over several)."""
    return [r for _, r in runner.engines] if isinstance(runner, ShapeDispatch) else [runner]


def wrapper_prefix(module: torch.nn.Module, runner: Runner, xl: bool) -> str:
    """`module`'s name inside the flat-tensor wrapper that export traced (`unet`, `encoder`, ...): engines name
    their weights from there."""
    return next(n for n, child in wrap(module, runner.spec, xl).named_children() if child is module)


def swap_rebuild_command(bundle: ModelBundle, plan: StagePlan, backend: str, precision: str, dilation: int,
                         engine_dir: Path, device: torch.device) -> str:
    """The mf-build-engines command for engines that take LoRA swaps: base weights, unfused ONNX for onnxruntime,
    aoti for backends that cannot swap at all; `--force` where the same keys must be built again."""
    same = not get_backend(backend).swap_note
    cmd = build_command(bundle, plan, backend if same else "aoti", precision, dilation, engine_dir, device.type, "none")
    return cmd + (" --force" if same else "")


class LoraSwap:
    """Swaps LoRAs into the engines of `nets`, which were opened for `bundle`'s base weights (the bundle itself
    keeps them: every swap starts from them)."""

    def __init__(self, nets: EngineNetworks, bundle: ModelBundle, rebuild: str):
        self.nets, self.bundle, self.rebuild = nets, bundle, rebuild
        self.backend = get_backend(nets.backend)
        if self.backend.swap_note:
            raise SwapRefused(f"{nets.backend} engines cannot take a LoRA without a rebuild: {self.backend.swap_note}; "
                              f"build engines that can with: {rebuild}")
        self.base = dict(nets.weights)
        self.changed: dict[str, set[str]] = {}
        """Weight names per network that the last swap changed from the base (the next swap restores them)."""

    def swap(self, specs: list[LoraSpec]) -> SwapReport:
        """Puts `specs` (in order, as `fuse_loras` would fuse them) into the engines in place of the last swap's.
        LoraError for a file that does not fit the model (nothing changed then); SwapRefused for an engine that
        cannot take the weights (engines before it in the loop may hold them already: swap again, or reopen)."""
        t0 = time.perf_counter()
        fused = fused_weights(self.bundle, specs, self.nets.device)  # reads and checks every file first
        tensors = engines = 0
        for (network, _), runner in sorted(self.nets.runners.items()):
            module = self.bundle.module_for(network)
            weights = dict(fused.get(network, {}))
            for name in self.changed.get(network, set()) - weights.keys():  # back to the base
                weights[name] = module.get_parameter(name).detach()
            if not weights:
                continue
            prefix = wrapper_prefix(module, runner, self.bundle.family.is_xl)
            for engine in engines_of(runner):
                try:
                    tensors += self.backend.swap_weights(engine, module, prefix, weights)
                except WeightSwapError as e:
                    raise SwapRefused(f"{e}; rebuild with: {self.rebuild}") from None
                engines += 1
        if self.nets.device.type == "cuda":
            torch.cuda.synchronize(self.nets.device)
        self.changed = {network: set(w) for network, w in fused.items()}
        loras = [(s.path, s.scale) for s in specs]
        for network, base in self.base.items():
            self.nets.weights[network] = lora_fingerprint(base, loras) if network in fused and loras else base
        return SwapReport(time.perf_counter() - t0, tensors, engines, dict(self.nets.weights))
