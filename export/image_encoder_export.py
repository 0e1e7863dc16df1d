"""Export of the IP-Adapter image encoder (`image_encoder`, core/image_encoder_specs.py): a CLIP vision model with
projection, traced from `pixel_values` to `image_embeds` at its one fixed shape, to a static AOTInductor package or
an ONNX model, through export/'s shared compile and clean-up."""
from __future__ import annotations

import contextlib
import gc
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..core.specs import NetworkSpec
from .aoti_export import package_exported
from .onnx_export import OPSET, PROTOBUF_LIMIT, ExportError, ExportResult, _eager_attention, _finish, cast_copy


class ImageEncoderWrapper(torch.nn.Module):
    """image_embeds from pixel_values (transformers returns a ModelOutput)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        return self.encoder(pixel_values=pixel_values).image_embeds


def _on(encoder: torch.nn.Module, spec: NetworkSpec, device: str) -> torch.nn.Module:
    """The encoder in the spec's dtype on `device` (a cast copy when it is not there; the caller's left as is)."""
    dtype = spec.outputs[0].torch_dtype
    if dtype != encoder.dtype or torch.device(device).type != encoder.device.type:
        return cast_copy(encoder, dtype).to(device)
    return encoder


def export_image_encoder_aoti(encoder: torch.nn.Module, spec: NetworkSpec, path, *, device: str = "cpu",
                              kernel_context=contextlib.nullcontext) -> ExportResult:
    """A static AOTInductor package (`.pt2`) of `encoder` at the spec's one shape."""
    t0 = time.perf_counter()
    module = _on(encoder, spec, device)
    args = tuple(a.to(device) for a in spec.sample_inputs({}))

    def trace():
        return torch.export.export(ImageEncoderWrapper(module).eval(), args, strict=False)

    return package_exported(trace, Path(path), spec.name, t0, kernel_context=kernel_context)


def export_image_encoder_onnx(encoder: torch.nn.Module, spec: NetworkSpec, path, *,
                              device: str = "cpu") -> ExportResult:
    """`encoder` to the `.onnx` file `path` at the spec's one shape (eager attention while tracing, as the text
    encoders are exported)."""
    t0 = time.perf_counter()
    path = Path(path)
    module = _on(encoder, spec, device)
    args = tuple(a.to(device) for a in spec.sample_inputs({}))
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".export-{spec.name}-") as tmp:
            raw = Path(tmp) / "raw.onnx"
            with torch.no_grad(), warnings.catch_warnings(), _eager_attention(module):
                warnings.simplefilter("ignore")
                torch.onnx.export(ImageEncoderWrapper(module).eval(), args, str(raw),
                                  input_names=[t.name for t in spec.inputs],
                                  output_names=[t.name for t in spec.outputs], opset_version=OPSET,
                                  do_constant_folding=True, dynamo=False)
            del args, module
            gc.collect()
            files = _finish(raw, path, True, PROTOBUF_LIMIT)
    except Exception as e:  # noqa: BLE001 - one message naming the network, cause chained
        raise ExportError(f"exporting {spec.name} failed: {type(e).__name__}: {e}") from e
    return ExportResult(files, time.perf_counter() - t0, sum(f.stat().st_size for f in files))
