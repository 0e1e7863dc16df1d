"""The reference backend: an entry records the weights and the coverage; running it runs the loaded modules.

Its entries have no files. It exists so that one engine folder and one code path serve every backend, and
so that an engine comparison has the modules themselves as one side.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.dilation import mid_dilation
from ..core.specs import UNET, VAE_PRECISIONS, NetworkSpec
from ..core.wrappers import wrap
from .backend import Backend, BuildJob, BuildOutput, Log, OpenContext


class ModuleRunner:
    """One network of the loaded model behind the `Runner` interface, cast to the spec's precision."""

    def __init__(self, module: torch.nn.Module, spec: NetworkSpec, xl: bool, device: torch.device):
        self.spec = spec
        # Both VAE halves share one module; casting it twice to the same dtype is a no-op.
        module.to(device=device, dtype=spec.outputs[0].torch_dtype)
        self.module = module
        self.wrapper = wrap(module, spec, xl).eval()
        self.capturable = True  # plain torch ops on the current stream

    @torch.inference_mode()
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [inputs[t.name] for t in self.spec.inputs]
        if self.spec.network == UNET:
            with mid_dilation(self.module, self.spec.dilation):  # weights untouched; restored after the call
                out = self.wrapper(*args)
        else:
            out = self.wrapper(*args)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return {t.name: y for t, y in zip(self.spec.outputs, outs)}


class TorchBackend(Backend):
    name = "torch"
    vae_precisions = VAE_PRECISIONS
    preference = {"cuda": 3, "cpu": 2}
    runs_modules = True
    swap_note = "entries run the loaded model's own modules and are keyed by their exact weights"

    def version(self) -> str:
        return torch.__version__

    def build(self, job: BuildJob, staging: Path, log: Log) -> BuildOutput:
        return BuildOutput()  # nothing to write: the key holds the weights fingerprint and the profiles

    def open(self, entry, path, spec: NetworkSpec, ctx: OpenContext) -> ModuleRunner:
        if ctx.bundle is None:
            raise ValueError("torch entries run the loaded model's modules; none was given")
        return ModuleRunner(ctx.bundle.module_for(spec.network), spec, ctx.family.is_xl, ctx.device)


BACKEND = TorchBackend()
