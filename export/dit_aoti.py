"""AOTInductor packages of the SD3 and FLUX transformers: one static package per precision and stage shape (batch
and token grid fixed), as the aoti backend builds the latent UNets by default; Inductor specialises every kernel to
the shape, as the compiled path does.

The inputs are the ONNX exports' (core/dit_specs.transformer_spec, export/dit_flux_export.flux_transformer_spec),
with the float tensors in the package's precision: FLUX takes its rotary tables as inputs here too, so a package
holds no position-id arithmetic and the runner computes them with the model's own `pos_embed`.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..core.dit_families import DiTFamily
from ..core.dit_loading import DiTBundle
from ..core.dit_specs import SD3TransformerWrapper, transformer_spec
from ..core.specs import NetworkSpec
from .dit_flux_export import FluxTransformerWrapper, flux_transformer_spec, rotary_given
from .aoti_export import package_exported
from .onnx_export import ExportResult, cast_copy

DIT_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""Package precision -> the dtype of the transformer's float inputs and output."""

_KEEP_FP32 = {"sd3": {"timestep"}, "flux": {"guidance", "rotary_cos", "rotary_sin"}}
"""Inputs that stay float32 whatever the precision (the module takes them so)."""


def dit_spec(family: DiTFamily, precision: str, guidance_embeds: bool = True) -> NetworkSpec:
    """The transformer's spec with its float tensors in `precision` (fp32, fp16 or bf16)."""
    if precision not in DIT_PRECISIONS:
        raise ValueError(f"precision {precision!r}: transformer packages are {', '.join(DIT_PRECISIONS)}")
    base = transformer_spec(family) if family.kind == "sd3" else flux_transformer_spec(family, "fp32", guidance_embeds)
    f, keep = DIT_PRECISIONS[precision], _KEEP_FP32[family.kind]

    def retype(t):
        return replace(t, dtype=f) if t.dtype == "float32" and t.name not in keep else t

    return replace(base, precision=precision, inputs=tuple(map(retype, base.inputs)),
                   outputs=tuple(map(retype, base.outputs)))


def dit_axes(family: DiTFamily, batch: int, latent_h: int, latent_w: int) -> dict[str, int]:
    """Values of the spec's axes for a transformer batch and latent size."""
    if family.kind == "sd3":
        return {"batch": batch, "height": latent_h, "width": latent_w}
    tokens = (latent_h // 2) * (latent_w // 2)
    return {"batch": batch, "tokens": tokens, "positions": family.t5_max_length + tokens}


def export_dit_aoti(bundle: DiTBundle, spec: NetworkSpec, path: str | os.PathLike, batch: int, latent_h: int,
                    latent_w: int, *, device: str = "cpu", kernel_context=contextlib.nullcontext) -> ExportResult:
    """Exports the transformer at (batch, latent size) and compiles it into the package `path` (`.pt2`)."""
    t0 = time.perf_counter()
    path = Path(path)
    fam, module = bundle.family, bundle.transformer
    dtype = spec.outputs[0].torch_dtype
    if dtype != module.dtype or torch.device(device).type != module.device.type:
        module = cast_copy(module, dtype).to(device)
    g = torch.Generator().manual_seed(0)
    axes = dit_axes(fam, batch, latent_h, latent_w)
    args = tuple(torch.randn(t.concrete(axes), generator=g).to(device=device, dtype=t.torch_dtype)
                 for t in spec.inputs)
    def trace():
        with contextlib.ExitStack() as stack:
            if fam.kind == "sd3":
                wrapper = SD3TransformerWrapper(module)
            else:
                wrapper = FluxTransformerWrapper(module, stack.enter_context(rotary_given(module)))
            return torch.export.export(wrapper.eval(), args, strict=False)

    return package_exported(trace, path, f"{spec.name} at latent {latent_w}x{latent_h}", t0,
                            kernel_context=kernel_context)
