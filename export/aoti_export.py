"""AOTInductor export of one network spec: `torch.export` with dynamic latent sides, compiled into a `.pt2`
package that Python (`torch._inductor.aoti_load_package`) and C++ (`torch::inductor::AOTIModelPackageLoader`)
load without compiling.

A package serves what its one `ShapeProfile` says: a spatial axis whose min and max differ is dynamic (in steps
of the UNet's size multiple), one whose min equals max is static. The aoti backend builds static packages, one
per network and stage shape (Inductor specialises every kernel to the shape, as the compiled path does), or with
`--dynamic` one package over the plan's whole range of sides (`megafusion.core.specs.range_profile`), which also
serves other plans and aspect ratios within that range.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..core.dilation import mid_dilation
from ..core.loading import ModelBundle
from ..core.families import ModelFamily
from .onnx_export import ExportError, ExportResult, cast_copy
from ..core.wrappers import wrap
from ..core.plan import StagePlan
from ..core.specs import SPATIAL_AXES, UNET, NetworkSpec, ShapeProfile

def dynamic_shapes(family: ModelFamily, spec: NetworkSpec,
                   profile: ShapeProfile) -> dict[str, dict[int, object] | None]:
    """`torch.export` dynamic shapes: sides as multiples of the UNet's size multiple (latent: multiple / vae
    scale), one Dim per axis name shared across inputs; an axis whose range is one value stays static."""
    from torch.export import Dim

    q_lat = family.pixel_multiple // family.vae_scale  # latent sides must be multiples of 2^(UNet downsamples)
    ranges = {n: (lo, hi) for n, lo, _, hi in profile.shapes}
    dims: dict[str, object] = {}
    out: dict[str, dict[int, object] | None] = {}
    for t in spec.inputs:
        lo, hi = ranges[t.name]
        axes: dict[int, object] = {}
        for i, d in enumerate(t.shape):
            if isinstance(d, int) or lo[i] == hi[i]:
                continue
            if d == "batch":
                axes[i] = dims.setdefault("batch", Dim("batch", min=lo[i], max=hi[i]))
                continue
            if d not in SPATIAL_AXES:
                raise ExportError(f"{spec.name}: no export rule for dynamic axis {d!r}")
            side = "h" if d in ("height", "image_height") else "w"
            step = q_lat if d in ("height", "width") else q_lat * family.vae_scale
            # One Dim per side, in units of the UNet multiple; latent and image axes are multiples of it.
            base = dims.setdefault(side, Dim(f"{side}_units", min=lo[i] // step, max=hi[i] // step))
            axes[i] = step * base
        out[t.name] = axes or None
    return out


def export_aoti(bundle: ModelBundle, spec: NetworkSpec, profile: ShapeProfile, path: str | os.PathLike, *,
                device: str = "cpu", kernel_context=contextlib.nullcontext,
                weights_path: Path | None = None, module: torch.nn.Module | None = None) -> ExportResult:
    """Exports `spec`'s network over `profile`'s range and compiles it into the package `path` (`.pt2`).

    `kernel_context()` is entered around the compile: kernel choices made there (which SDPA backend an attention
    call lowers to) are what the package runs. `weights_path`: the package holds no weights, they go to this
    safetensors file instead (export/aoti_weights.py). `module`: exported instead of the bundle's (an FP8 UNet,
    already in the spec's dtype on `device`)."""
    t0 = time.perf_counter()
    path = Path(path)
    fam = bundle.family
    module = bundle.module_for(spec.network) if module is None else module
    dtype = spec.outputs[0].torch_dtype
    # Trace at the largest batch (a batch of 1 would be specialised) and stage 1's size.
    opt = profile.shapes[0][2]
    lat_h, lat_w = _latent_of(spec, opt, fam.vae_scale)
    axes = spec.axes(spec.batch_range[2], lat_h, lat_w, fam.vae_scale)
    args = tuple(a.to(device) for a in spec.sample_inputs(axes))
    owned = dtype != module.dtype or torch.device(device).type != module.device.type
    if owned:
        module = cast_copy(module, dtype).to(device)

    def trace():
        wrapper = wrap(module, spec, fam.is_xl).eval()
        ds = dynamic_shapes(fam, spec, profile)
        # The exported graph keeps aten.scaled_dot_product_attention; Inductor picks its kernel while compiling.
        with mid_dilation(module, spec.dilation) if spec.network == UNET else contextlib.nullcontext():
            return torch.export.export(wrapper, args, dynamic_shapes=tuple(ds[t.name] for t in spec.inputs),
                                       strict=False)

    return package_exported(trace, path, spec.name, t0, kernel_context=kernel_context, weights_path=weights_path)


def package_exported(trace: Callable[[], "torch.export.ExportedProgram"], path: Path, what: str, t0: float, *,
                     kernel_context=contextlib.nullcontext, weights_path: Path | None = None) -> ExportResult:
    """`trace()` (no grad, warnings off), then its program compiled into the AOTInductor package `path` inside
    `kernel_context()`: kernel choices made there (which SDPA backend an attention call lowers to) are what the
    package runs. Timed from `t0`. Any failure is one ExportError naming `what`, its cause chained.
    `weights_path`: compiled without its weights, which are written to this file (export/aoti_weights.py)."""
    apart = {"aot_inductor.package_constants_in_so": weights_path is None}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = trace()
            path.parent.mkdir(parents=True, exist_ok=True)
            with kernel_context(), torch._inductor.config.patch(apart):
                torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
            if weights_path is not None:
                from .aoti_weights import program_weights, write_weights

                write_weights(program_weights(ep), weights_path)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - one message naming the network, cause chained
        raise ExportError(f"AOTInductor export of {what} failed: {type(e).__name__}: {e}") from e
    files = (path,) if weights_path is None else (path, weights_path)
    return ExportResult(files, time.perf_counter() - t0, sum(f.stat().st_size for f in files))


def _latent_of(spec: NetworkSpec, shape: tuple[int, ...], vae_scale: int) -> tuple[int, int]:
    """Latent (h, w) of the first input's shape (image inputs are vae_scale times larger)."""
    first = spec.inputs[0]
    if len(shape) != 4:
        return 1, 1  # text encoders: no spatial axes
    s = vae_scale if first.shape[2] == "image_height" else 1
    return shape[2] // s, shape[3] // s
