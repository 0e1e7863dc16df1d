"""AOTInductor packages of DeepFloyd IF's UNets: one static package per cascade stage, precision, dilation and stage
shape (`if_unet_spec`'s inputs, batch and sides fixed), as the aoti backend builds the latent UNets by default:
Inductor specialises every kernel to the shape, as the compiled path does."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from ..core.dilation import mid_dilation
from ..core.if_loading import IFBundle
from ..core.specs import NetworkSpec
from .if_onnx import IFUNetWrapper, if_sample_inputs
from .aoti_export import package_exported
from .onnx_export import ExportError, ExportResult, cast_copy


def export_if_aoti(bundle: IFBundle, spec: NetworkSpec, path: str | os.PathLike, batch: int, height: int, width: int,
                   *, device: str = "cpu", kernel_context=contextlib.nullcontext) -> ExportResult:
    """Exports the spec's UNet at (batch, height, width) and compiles it into the package `path` (`.pt2`)."""
    t0 = time.perf_counter()
    path = Path(path)
    module = bundle.unet_1 if spec.network.endswith("_I") else bundle.unet_2
    if module is None:
        raise ExportError(f"{spec.network}: this bundle has no stage II UNet")
    dtype = spec.outputs[0].torch_dtype
    if dtype != module.dtype or torch.device(device).type != module.device.type:
        module = cast_copy(module, dtype).to(device)
    args = tuple(a.to(device) for a in if_sample_inputs(spec, batch, height, width))
    def trace():
        with mid_dilation(module, spec.dilation):
            return torch.export.export(IFUNetWrapper(module).eval(), args, strict=False)

    return package_exported(trace, path, f"{spec.name} at {width}x{height}", t0, kernel_context=kernel_context)
