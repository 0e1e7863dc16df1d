"""The ONNX step that the ONNX Runtime and TensorRT builds share: export a network (optionally fused by ONNX
Runtime's transformer optimizer) into a staging folder."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..core.families import ModelFamily
from ..core.specs import NetworkSpec, network_spec
from ..export.onnx_export import ExportResult, export_onnx
from ..export.ort_optimize import SOURCE_PRECISION, optimize_onnx
from .backend import BuildJob, BuildOutput, Log


def exported_spec(family: ModelFamily, spec: NetworkSpec, ort_optimize: str) -> NetworkSpec:
    """The spec exported for an entry: its own, or its fp32 twin where ORT fuses an fp16 engine (fusion needs
    the fp32 graph; see `ort_optimize.SOURCE_PRECISION`)."""
    if ort_optimize == "none" or spec.precision == SOURCE_PRECISION:
        return spec
    return network_spec(family, spec.network, SOURCE_PRECISION, spec.dilation)


def export_model(job: BuildJob, onnx_path: Path, log: Log) -> BuildOutput:
    """Exports the job's network to `onnx_path`, fused for `job.ort_optimize` unless that is `none`."""
    spec = job.requirement.spec
    if job.ort_optimize == "none":
        res = export_onnx(job.bundle, spec, onnx_path, device=job.device)
        log(f"    exported ONNX in {res.seconds:.1f} s, {res.bytes / 2**20:.1f} MiB")
        return BuildOutput(res)
    # Export at fp32 into a temp folder beside `onnx_path`, fuse into `onnx_path`; the plain export is removed
    # before the staging folder is committed (the entry holds the optimized model only).
    with tempfile.TemporaryDirectory(dir=onnx_path.parent, prefix=".plain-") as plain:
        source = exported_spec(job.bundle.family, spec, job.ort_optimize)
        res = export_onnx(job.bundle, source, Path(plain) / "model.onnx", device=job.device)
        log(f"    exported ONNX in {res.seconds:.1f} s, {res.bytes / 2**20:.1f} MiB")
        opt = optimize_onnx(res.files[0], onnx_path, spec, job.ort_optimize)
    summary = ", ".join(f"{k} {v}" for k, v in opt.fused.items()) or "nothing fused"
    log(f"    ORT-optimized for {job.ort_optimize} in {opt.seconds:.1f} s: {summary}")
    total = sum(f.stat().st_size for f in opt.files)
    return BuildOutput(ExportResult(opt.files, res.seconds + opt.seconds, total), opt.fused)
