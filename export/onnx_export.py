"""ONNX export of one network spec: flat-tensor wrapper modules, dynamic axes, graph clean-up, fp16.

The TorchScript exporter (`dynamo=False`) traces the wrapper once at a sample shape; batch and spatial
axes stay symbolic. The dilated UNet is the same weights with the mid-block dilation set during export.
Clean-up: torch's constant folding, onnxscript's constant folding and dead-node removal, ONNX shape
inference. Models over 2 GB (the protobuf limit) keep their weights in one external `.data` file.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.dilation import mid_dilation
from ..core.loading import ModelBundle
from ..core.specs import UNET, NetworkSpec
from ..core.wrappers import wrap

PROTOBUF_LIMIT = 2 * 1024**3
"""Serialized ONNX models must stay under this; larger weights go to external data."""

OPSET = 17
"""ONNX opset: LayerNormalization is native from 17; TensorRT 10 and ORT 1.20+ read it."""


class ExportError(RuntimeError):
    """An export failed; the message names the network."""


def cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy in `dtype` that never holds a second full-precision copy (peak: original + cast weights)."""
    memo: dict[int, object] = {}
    for t in (*module.parameters(), *module.buffers()):
        cast = t.detach().to(dtype) if t.is_floating_point() else t.detach()
        memo[id(t)] = torch.nn.Parameter(cast, requires_grad=False) if isinstance(t, torch.nn.Parameter) else cast
    return copy.deepcopy(module, memo)


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote."""

    files: tuple[Path, ...]
    """The model file first, then its external data file if any."""
    seconds: float
    """Wall time of trace, clean-up and save."""
    bytes: int
    """Total size of the files."""


def export_onnx(bundle: ModelBundle, spec: NetworkSpec, path: str | os.PathLike, *, device: str = "cpu",
                sample_latent: tuple[int, int] | None = None, external_threshold: int = PROTOBUF_LIMIT,
                clean: bool = True) -> ExportResult:
    """Exports `spec`'s network from `bundle` to `path` (an `.onnx` file; `<path>.data` if external).

    sample_latent: (h, w) latent size traced at (default: the native size on a GPU, the smallest legal latent
    on CPU); external_threshold: bytes of weights above which they go to external data (lower it in tests to
    exercise that path).
    """
    t0 = time.perf_counter()
    path = Path(path)
    fam = bundle.family
    module = bundle.module_for(spec.network)
    dtype = spec.outputs[0].torch_dtype
    if sample_latent is None and _resolve(device).type == "cpu":
        # The trace runs one real forward pass, and on CPUs without AVX512-FP16/AMX torch's fp16 convolutions
        # are reference loops (measured on a 2-core EPYC: 230 s for one 320->320 3x3 conv at 2x64x64, fp32
        # 1.7 s), so an fp16 SD1.5 UNet traced at its native 64x64 latent had not finished after 15 minutes.
        # The axes are dynamic and the graph does not depend on the traced size (the tests check ORT against
        # torch at other sizes), so trace at the smallest latent the UNet accepts: 2^downsamples per side.
        sample_latent = (2 ** fam.unet_downsamples,) * 2
    h, w = sample_latent or (fam.native_height // fam.vae_scale, fam.native_width // fam.vae_scale)
    axes = spec.axes(spec.batch_range[1], h, w, fam.vae_scale)
    args = tuple(a.to(device) for a in spec.sample_inputs(axes))
    owned = dtype != module.dtype or _resolve(device) != _resolve(module.device)
    if owned:  # export from a cast copy; the bundle keeps its weights
        module = cast_copy(module, dtype).to(device)
    try:
        wrapper = wrap(module, spec, fam.is_xl).eval()
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".export-{spec.name}-") as tmp:
            raw = Path(tmp) / "raw.onnx"
            _trace(wrapper, module, spec, args, raw)
            del wrapper, args
            if owned:
                del module
            gc.collect()
            files = _finish(raw, path, clean, external_threshold)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - one message naming the network, cause chained
        raise ExportError(f"exporting {spec.name} failed: {type(e).__name__}: {e}") from e
    return ExportResult(files, time.perf_counter() - t0, sum(f.stat().st_size for f in files))


def _resolve(device: str | torch.device) -> torch.device:
    """`cuda` as the index it means: torch.device('cuda') != module.device ('cuda:0'), and a mismatch here would
    deep-copy a module already on the export device (5 GB more for the SDXL UNet on a GPU)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def _trace(wrapper, module, spec: NetworkSpec, args, raw: Path) -> None:
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        ctx = mid_dilation(module, spec.dilation) if spec.network == UNET else _eager_attention(module)
        with ctx:
            torch.onnx.export(wrapper, args, str(raw), input_names=names_in, output_names=names_out,
                              dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, do_constant_folding=True,
                              dynamo=False)


@contextlib.contextmanager
def _eager_attention(module: torch.nn.Module):
    """transformers' eager attention while tracing: the exporter's SDPA causal mask is float32 even in fp16."""
    set_impl = getattr(module, "set_attn_implementation", None)
    before = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if set_impl is None or before is None:
        yield
        return
    set_impl("eager")
    try:
        yield
    finally:
        set_impl(before)


def _finish(raw: Path, path: Path, clean: bool, external_threshold: int) -> tuple[Path, ...]:
    import onnx
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    from onnxscript import optimizer

    model = ir.load(raw)  # reads any external data the exporter wrote
    if clean:
        # The full onnxscript optimizer's rewrite rules take minutes on a UNet; folding plus dead-code
        # removal gets the shape-arithmetic clean-up that matters to TensorRT and ORT.
        optimizer.fold_constants(model, onnx_shape_inference=False)
        passes.IdentityEliminationPass()(model)
        passes.RemoveUnusedNodesPass()(model)
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if weights > external_threshold:
        ir.save(model, path, external_data=data.name)
    else:  # inline: read the exporter's external tensors in first, or the file would point into its temp folder
        ir.external_data.load_to_model(model)
        ir.save(model, path)
    del model
    if clean:
        onnx.shape_inference.infer_shapes_path(str(path), str(path))  # path-based: works past 2 GB
    return (path, data) if data.exists() else (path,)
