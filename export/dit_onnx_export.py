"""ONNX export of the SD3 transformer with dynamic batch, height and width (core/dit_specs.py).

TorchScript exporter at opset 18, as export/onnx_export.py uses for the UNet. FLUX is exported by
export/dit_flux_export.py instead: its RMS q/k norms are `aten::rms_norm`, which that exporter has no symbolic
for, and its rotary embedding is traced with the sample's token count as a constant; there, the rotary tables
are inputs and the dynamo exporter runs.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from ..core.dit_loading import DiTBundle
from ..core.dit_specs import SD3TransformerWrapper, transformer_spec
from .onnx_export import PROTOBUF_LIMIT, _finish

OPSET = 18


def export_sd3_transformer(bundle: DiTBundle, path: str | Path, precision: str = "fp32",
                           sample_latent: tuple[int, int] | None = None,
                           external_threshold: int = PROTOBUF_LIMIT) -> tuple[Path, ...]:
    """Writes `path` (and `<path>.data` when the weights pass `external_threshold`, as SD3 Medium's do) after
    export/onnx_export.py's clean-up; returns the files. Traced at `sample_latent` (default: the smallest latent
    the size rule allows)."""
    fam = bundle.family
    spec = transformer_spec(fam, precision)
    dtype = spec.outputs[0].torch_dtype
    if bundle.transformer.dtype != dtype:
        raise ValueError(f"export at {precision} needs the transformer in {dtype}, not {bundle.transformer.dtype}")
    h, w = sample_latent or (fam.patch * 2, fam.patch * 2)
    g = torch.Generator().manual_seed(0)
    axes = {"batch": 2, "height": h, "width": w}
    args = tuple(torch.randn(t.concrete(axes), generator=g).to(t.torch_dtype).to(bundle.transformer.device)
                 for t in spec.inputs)
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-transformer-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(SD3TransformerWrapper(bundle.transformer).eval(), args, str(raw),
                              input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                              dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, do_constant_folding=True,
                              dynamo=False)
        return _finish(raw, path, True, external_threshold)
