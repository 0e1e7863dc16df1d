"""Build what a stage plan needs into an engine cache: export each network once, build it for a backend,
commit it atomically. Entries already built and valid are skipped; invalid ones are rebuilt.
"""
from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megafusion.export.aoti_export import export_aoti, range_profile
from megafusion.export.loading import ModelBundle
from megafusion.export.onnx_export import ExportResult, export_onnx, source_module
from megafusion.export.ort_optimize import ORT_OPTIMIZE_CHOICES, SOURCE_PRECISION, optimize_onnx
from megafusion.export.plan import StagePlan
from megafusion.export.specs import (PRECISIONS, NetworkSpec, Requirement, network_spec, plan_requirements,
                                     profile_sizes)

from . import onnxruntime_backend, tensorrt_backend
from .cache import EngineCache, EngineKey, Entry, weights_fingerprint
from .model_facts import record_model

BACKENDS = ("onnxruntime", "tensorrt", "torch", "aoti")


def backend_version(backend: str) -> str:
    if backend == "onnxruntime":
        return onnxruntime_backend.version()
    if backend == "tensorrt":
        return tensorrt_backend.version()
    if backend in ("torch", "aoti"):  # AOTInductor packages are tied to the torch that compiled them
        return torch.__version__
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def device_name(device: torch.device | str) -> str:
    """What the cache key records: 'cpu' or the GPU's marketing name."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass(frozen=True)
class BuildRequest:
    """What `mf-build-engines` asks for."""

    plan: StagePlan
    """The stage plan whose shapes the engines must serve."""
    backend: str
    """`onnxruntime`, `tensorrt` or `torch`."""
    precision: str
    """`fp32` or `fp16` for the UNet and text encoders."""
    output: Path
    """The engine folder (created if missing)."""
    vae_precision: str | None = None
    """VAE precision; None picks fp32 where the VAE overflows in fp16."""
    dilation: int = 2
    """Mid-block dilation of stages after the first; 1 builds no dilated UNet."""
    device: str = "cpu"
    """Device the engines are for (and exported on)."""
    force: bool = False
    """Rebuild even entries that are present and valid."""
    check_load: bool = True
    """onnxruntime: open each exported model once on `device` before committing it. Off saves a session
    creation per network (tens of seconds for a real-size UNet on the CUDA EP) where the caller opens them next."""
    release_weights: bool = False
    """Let the build cast the bundle's modules in place to the precision they are exported at and free each
    one (to the meta device) after its last network: the bundle is unusable afterwards. This is what keeps a
    real-size SDXL fp16 export within 24 GB of RAM (no fp32 bundle beside the fp16 copy and the exporter's own
    copy of the weights). `mf-build-engines` sets it; callers that reuse the bundle leave it off."""
    ort_optimize: str = "none"
    """onnxruntime: fuse each exported graph with ONNX Runtime's transformer optimizer for this execution provider
    (`cpu` or `cuda`; see `megafusion.export.ort_optimize`), or `none`. Part of the engine key."""
    networks: tuple[str, ...] = ()
    """Build only these networks of the plan (see `select_networks`); empty builds all. Several builds of one
    folder with disjoint selections may run at once (commits and models.json are written under the cache's lock)."""


@dataclass
class BuildReport:
    """What a build did, entry by entry."""

    built: list[tuple[Entry, float]] = field(default_factory=list)
    """Entries built, with seconds taken (export plus backend build)."""
    skipped: list[Entry] = field(default_factory=list)
    """Entries already present and valid."""
    exports: dict[str, ExportResult] = field(default_factory=dict)
    """The ONNX export of each built entry, by entry digest (its time apart from the backend build; with
    `ort_optimize`, export plus optimization, and the optimized files)."""
    fused: dict[str, dict[str, int]] = field(default_factory=dict)
    """Fused contrib ops of each ORT-optimized entry, by entry digest (e.g. {"MultiHeadAttention": 16})."""


def engine_key(bundle: ModelBundle, r: Requirement, backend: str, version: str, device: str,
               fingerprint: str, ort_optimize: str = "none") -> EngineKey:
    s = r.spec
    return EngineKey(bundle.family.name, fingerprint, s.network, s.variant, s.dilation, s.precision,
                     r.profiles, backend, version, device, ort_optimize)


def check_ort_optimize(backend: str, ort_optimize: str, device: str) -> None:
    """Raises ValueError naming the value if `ort_optimize` does not fit the backend or the device."""
    if ort_optimize not in ORT_OPTIMIZE_CHOICES:
        raise ValueError(f"unknown ORT optimization {ort_optimize!r}; choose one of {', '.join(ORT_OPTIMIZE_CHOICES)}")
    if ort_optimize != "none" and backend != "onnxruntime":
        raise ValueError(f"ORT optimization {ort_optimize!r} applies to the onnxruntime backend only, not {backend!r}")
    if ort_optimize == "cuda" and torch.device(device).type != "cuda":
        raise ValueError(f"ORT optimization 'cuda' adds ops only the CUDA EP runs (GroupNorm, NhwcConv, ...); "
                         f"engines for device {device!r} need 'cpu' or 'none'")


def network_selectors(reqs: tuple[Requirement, ...]) -> dict[str, set[str]]:
    """What `--networks` accepts for a plan: each network name (every variant of it), and for the UNet
    `unet-standard` / `unet-dilated`; each maps to the spec names it selects."""
    out: dict[str, set[str]] = {}
    for r in reqs:
        s = r.spec
        out.setdefault(s.network, set()).add(s.name)
        if s.network == "unet":
            out.setdefault(f"unet-{s.variant}", set()).add(s.name)
    return out


def select_networks(reqs: tuple[Requirement, ...], selectors: tuple[str, ...]) -> tuple[Requirement, ...]:
    """The requirements `selectors` name (all if none); ValueError naming an unknown selector and the choices."""
    if not selectors:
        return reqs
    known = network_selectors(reqs)
    names: set[str] = set()
    for sel in selectors:
        if sel not in known:
            raise ValueError(f"unknown network {sel!r} for this plan; choose from {', '.join(sorted(known))}")
        names |= known[sel]
    return tuple(r for r in reqs if r.spec.name in names)


def build_engines(bundle: ModelBundle, req: BuildRequest,
                  log: Callable[[str], None] = lambda msg: None) -> BuildReport:
    """Exports and builds every network `req.plan` runs; returns what was built and what was skipped."""
    if req.backend not in BACKENDS:
        raise ValueError(f"unknown backend {req.backend!r}; choose one of {', '.join(BACKENDS)}")
    if req.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {req.precision!r}; choose one of {', '.join(PRECISIONS)}")
    check_ort_optimize(req.backend, req.ort_optimize, req.device)
    cache = EngineCache(req.output)
    cache.entries()  # a corrupt manifest stops the build before any work
    cache.remove_stale_staging()
    version, device = backend_version(req.backend), device_name(req.device)
    reqs = plan_requirements(bundle.family, req.plan, req.precision, req.dilation, req.vae_precision)
    if req.backend == "aoti":  # one package per network serves the plan's whole range of sides
        reqs = tuple(Requirement(r.spec, (range_profile(bundle.family, r.spec, req.plan),)) for r in reqs)
    reqs = select_networks(reqs, req.networks)
    if req.release_weights:  # modules this selection never exports are freed now (parallel builds share RAM)
        used = {id(source_module(bundle, r.spec)) for r in reqs}
        for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
            if id(m) not in used:
                m.to(device="meta")
        gc.collect()
    report, fingerprints = BuildReport(), {}
    for r in reqs:  # hashed as loaded (what `open_engines` hashes), before any in-place cast below
        module = source_module(bundle, r.spec)
        if id(module) not in fingerprints:
            fingerprints[id(module)] = weights_fingerprint(module)
    last_use = {id(source_module(bundle, r.spec)): n for n, r in enumerate(reqs, 1)}
    weights = {r.spec.network: fingerprints[id(source_module(bundle, r.spec))] for r in reqs}
    if req.release_weights:
        _cast_in_place(bundle, reqs, req)
    for n, r in enumerate(reqs, 1):
        module = source_module(bundle, r.spec)
        key = engine_key(bundle, r, req.backend, version, device, fingerprints[id(module)], req.ort_optimize)
        sizes = ", ".join(profile_sizes(r.spec.network, r.profiles, bundle.family.vae_scale)) or "fixed shape"
        tag = f"[{n}/{len(reqs)}] {r.spec.name} ({sizes})"
        entry = None if req.force else cache.lookup(key)
        if entry is not None:
            report.skipped.append(entry)
            log(f"{tag}: up to date, skipped")
            _release(module, req, last_use[id(module)] == n)
            continue
        fused_for = f", ORT-fused for {req.ort_optimize}" if req.ort_optimize != "none" else ""
        log(f"{tag}: building for {req.backend} {version} on {device}{fused_for} ...")
        t0 = time.perf_counter()
        with cache.staging(key) as tmp:
            exported, fused = _build_into(tmp, bundle, r, req, log)
            entry = cache.commit(key, tmp)
        seconds = time.perf_counter() - t0
        report.built.append((entry, seconds))
        if exported is not None:
            report.exports[entry.digest] = exported
        if fused is not None:
            report.fused[entry.digest] = fused
        size = sum(f.size for f in entry.files)
        log(f"{tag}: done in {seconds:.1f} s, {size / 2**20:.1f} MiB")
        _release(module, req, last_use[id(module)] == n)
    record_model(cache, bundle, weights)  # for runtimes without the model's Python objects (libmegafusion)
    return report


def _cast_in_place(bundle: ModelBundle, reqs: tuple[Requirement, ...], req: BuildRequest) -> None:
    """`release_weights`: each module that all its networks export at one dtype is cast to it in place, tensor
    by tensor, so export needs no cast copy (SDXL fp16: about 7 GB of weights in RAM instead of 14 + 5)."""
    dtypes: dict[int, set[torch.dtype]] = {}
    for r in reqs:  # the dtype each network is exported at (fp32 for an fp16 engine that ORT fuses)
        exported = _export_spec(bundle, r.spec, req)
        dtypes.setdefault(id(source_module(bundle, r.spec)), set()).add(exported.outputs[0].torch_dtype)
    for r in reqs:
        module, want = source_module(bundle, r.spec), dtypes[id(source_module(bundle, r.spec))]
        if len(want) == 1 and module.dtype not in want:  # every floating tensor, as `cast_copy` casts them
            torch.nn.Module.to(module, dtype=next(iter(want)))  # (diffusers' own .to warns about fp32 modules)


def _release(module: torch.nn.Module, req: BuildRequest, last: bool) -> None:
    """`release_weights`: after a module's last network, its tensors go to the meta device (memory freed)."""
    if req.release_weights and last:
        module.to(device="meta")
        gc.collect()


def _export_spec(bundle: ModelBundle, spec: NetworkSpec, req: BuildRequest) -> NetworkSpec:
    """The spec exported for an entry: its own, or its fp32 twin where ORT fuses an fp16 engine (fusion needs
    the fp32 graph; see `ort_optimize.SOURCE_PRECISION`)."""
    if req.ort_optimize == "none" or spec.precision == SOURCE_PRECISION:
        return spec
    return network_spec(bundle.family, spec.network, SOURCE_PRECISION, spec.dilation)


def _build_into(tmp: Path, bundle: ModelBundle, r: Requirement, req: BuildRequest,
                log: Callable[[str], None]) -> tuple[ExportResult | None, dict[str, int] | None]:
    """Writes the entry's files into `tmp`; (its ONNX export if any, fused op counts if ORT-optimized)."""
    if req.backend == "torch":
        return None, None  # the reference backend runs the modules; the entry records weights and coverage only
    if req.backend == "aoti":
        res = export_aoti(bundle, r.spec, r.profiles[0], tmp / "model.pt2", device=req.device)
        log(f"    exported and compiled with AOTInductor in {res.seconds:.1f} s")
        return res, None
    onnx_path = tmp / "model.onnx"
    fused = None
    if req.ort_optimize == "none":
        res = export_onnx(bundle, r.spec, onnx_path, device=req.device)
        log(f"    exported ONNX in {res.seconds:.1f} s, {res.bytes / 2**20:.1f} MiB")
    else:
        res, fused = _export_optimized(onnx_path, bundle, r, req, log)
    if req.backend == "onnxruntime":
        if req.check_load:  # on the engines' device: a CPU load of an fp16 SDXL UNet proves little and is slow
            # On CPU the check opens with basic optimizations: `all` would hold ~3.7x an fp16 model in RAM (about
            # 19 GB for the SDXL UNet, beside the bundle), past a 24 GB machine; sessions that run use `all`.
            level = "basic" if torch.device(req.device).type == "cpu" else "all"
            onnxruntime_backend.OrtRunner(onnx_path, r.spec, bundle.family.vae_scale, req.device, optimization=level)
        return res, fused
    timing_cache = Path(req.output) / f"timing-{device_name(req.device).replace(' ', '_')}.cache"
    plan = tensorrt_backend.build_engine(onnx_path, r.spec, r.profiles, r.spec.precision == "fp16", timing_cache)
    (tmp / "engine.plan").write_bytes(plan)
    for f in res.files:  # the engine is self-contained; the ONNX (GBs for SDXL) is not kept
        f.unlink()
    return res, None


def _export_optimized(onnx_path: Path, bundle: ModelBundle, r: Requirement, req: BuildRequest,
                      log: Callable[[str], None]) -> tuple[ExportResult, dict[str, int]]:
    """Exports (at fp32) into a temp folder beside `onnx_path`, fuses into `onnx_path`; the plain export is
    removed before the staging folder is committed (the entry holds the optimized model only)."""
    with tempfile.TemporaryDirectory(dir=onnx_path.parent, prefix=".plain-") as plain:
        res = export_onnx(bundle, _export_spec(bundle, r.spec, req), Path(plain) / "model.onnx", device=req.device)
        log(f"    exported ONNX in {res.seconds:.1f} s, {res.bytes / 2**20:.1f} MiB")
        opt = optimize_onnx(res.files[0], onnx_path, r.spec, req.ort_optimize)
    summary = ", ".join(f"{k} {v}" for k, v in opt.fused.items()) or "nothing fused"
    log(f"    ORT-optimized for {req.ort_optimize} in {opt.seconds:.1f} s: {summary}")
    total = sum(f.stat().st_size for f in opt.files)
    return ExportResult(opt.files, res.seconds + opt.seconds, total), opt.fused
