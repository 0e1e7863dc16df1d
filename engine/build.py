"""Build what a stage plan needs into an engine cache: export each network once, build it for a backend,
commit it atomically. Entries already built and valid are skipped; invalid ones are rebuilt.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.loading import ModelBundle
from ..core.plan import StagePlan
from ..core.specs import Requirement, default_vae_precision, plan_requirements, profile_sizes
from ..export.onnx_export import ExportResult
from .backend import Backend, BuildJob, apart_backends, get_backend
from .cache import EngineCache, EngineKey, Entry, device_name
from . import file_hashes
from .file_hashes import HASHES, FileHashes
from .fingerprint import network_fingerprint
from .fp8 import key_quantization
from .model_facts import record_model
from .onnx_build import exported_spec


@dataclass(frozen=True)
class BuildRequest:
    """What `mf-build-engines` asks for."""

    plan: StagePlan
    """The stage plan whose shapes the engines must serve."""
    backend: str
    """A registered backend's name (`megafusion.engine.backend.registry`)."""
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
    dynamic: bool = False
    """aoti: one package per network over the plan's range of sides, instead of one static package per network and
    stage shape (the default, as fast as the compiled path)."""
    networks: tuple[str, ...] = ()
    """Build only these networks of the plan (see `select_networks`); empty builds all. Several builds of one
    folder with disjoint selections may run at once (commits and models.json are written under the cache's lock)."""
    weights_apart: bool = False
    """aoti: packages hold no weights; each entry keeps them in `weights.safetensors`, read once per process and
    shared by the packages of the same weights (SDXL's standard and dilated UNets): one read, one device copy.
    Part of the engine key (`constants`). libmegafusion opens them too (`cpp/src/lib/aoti_weights.cpp`)."""
    fp8_scales: str = "token"
    """aoti at precision fp8: the UNet packages' input scales, per token at run time (`token`) or fixed per package
    by calibration runs at its stage shape (`static`, which needs `fp8_calibrate`). Part of the engine key."""
    fp8_calibrate: Callable | None = None
    """(quantized UNet copy, spec, profile) -> {layer: scale}: sets static scales on the copy before its export
    (runtime/fp8_calibration.py `package_calibrator`, made by the caller, which can encode the recipe's prompt)."""
    remember_hashes: bool = False
    """After the build, wait out the racy window of the files just built (engine/file_hashes.py: at most 2 s) and
    verify them once more, remembering their hashes: the first run from the folder then reads no engine file to
    verify it (SDXL's packages: about 12 GB). `mf-build-engines` sets it."""


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
               fingerprint: str, ort_optimize: str = "none", weights_apart: bool = False,
               fp8_scales: str = "token") -> EngineKey:
    s = r.spec
    return EngineKey(bundle.family.name, fingerprint, s.network, s.variant, s.dilation, s.precision,
                     r.profiles, backend, version, device, ort_optimize, "apart" if weights_apart else "inside",
                     key_quantization(s.network, s.precision, fp8_scales))


def check_request(req: BuildRequest) -> Backend:
    """The request's backend, after its options are checked; ValueError naming a bad value."""
    backend = get_backend(req.backend)
    backend.check_request(req.precision, req.ort_optimize, req.device, req.dynamic)
    if req.fp8_scales != "token":
        if req.fp8_scales != "static":
            raise ValueError(f"--fp8-scales {req.fp8_scales!r}: choose token or static")
        if req.precision != "fp8":
            raise ValueError(f"--fp8-scales static needs --precision fp8, not {req.precision}")
        if req.dynamic:
            raise ValueError("--fp8-scales static with --dynamic: static scales are calibrated per stage shape, one "
                             "package each; leave out --dynamic")
        if req.fp8_calibrate is None:
            raise ValueError("--fp8-scales static needs a calibration (BuildRequest.fp8_calibrate)")
    if req.weights_apart and not backend.weights_apart:
        raise ValueError(f"--weights-apart applies to {apart_backends()} engines only, not {backend.name}")
    if req.vae_precision is not None and req.vae_precision not in backend.vae_precisions:
        raise ValueError(f"backend {backend.name} builds VAEs in {', '.join(backend.vae_precisions)}, "
                         f"not {req.vae_precision!r}")
    return backend


def vae_precision(req: BuildRequest, family, backend: Backend) -> str | None:
    """The VAE precision to build: as asked, else bf16 for SDXL's VAE under fp16 on a GPU where the backend
    builds bf16 (what the runtime runs by default there), else the spec's default."""
    if req.vae_precision is not None:
        return req.vae_precision
    bf16 = "bf16" in backend.vae_precisions and torch.device(req.device).type == "cuda"
    return default_vae_precision(family, req.precision, bf16)


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
    backend = check_request(req)
    cache = EngineCache(req.output)
    cache.entries()  # a corrupt manifest stops the build before any work
    if removed := cache.remove_stale_staging():
        log(f"removed {removed} staging folder(s) left by killed builds")
    version, device = backend.version(), device_name(req.device)
    reqs = plan_requirements(bundle.family, req.plan, req.precision, req.dilation,
                             vae_precision(req, bundle.family, backend))
    reqs = tuple(one for r in reqs for one in backend.requirements(bundle.family, r, req.plan, req.dynamic))
    reqs = select_networks(reqs, req.networks)
    if req.release_weights:  # modules this selection never exports are freed now (parallel builds share RAM)
        used = {id(bundle.module_for(r.spec.network)) for r in reqs}
        for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
            if id(m) not in used:
                m.to(device="meta")
        gc.collect()
    report, fingerprints = BuildReport(), {}
    hashes = FileHashes(Path(req.output) / HASHES)  # weight files hashed here are not read again by runs
    for r in reqs:  # as loaded (what `open_engines` checks), before any in-place cast below
        module = bundle.module_for(r.spec.network)
        if id(module) not in fingerprints:
            fingerprints[id(module)] = network_fingerprint(bundle, r.spec.network, hashes)
    hashes.save()
    last_use = {id(bundle.module_for(r.spec.network)): n for n, r in enumerate(reqs, 1)}
    weights = {r.spec.network: fingerprints[id(bundle.module_for(r.spec.network))] for r in reqs}
    if req.release_weights:
        _cast_in_place(bundle, reqs, req)
    for n, r in enumerate(reqs, 1):
        module = bundle.module_for(r.spec.network)
        key = engine_key(bundle, r, backend.name, version, device, fingerprints[id(module)], req.ort_optimize,
                         req.weights_apart, req.fp8_scales)
        sizes = ", ".join(profile_sizes(r.spec.network, r.profiles, bundle.family.vae_scale)) or "fixed shape"
        tag = f"[{n}/{len(reqs)}] {r.spec.name} ({sizes})"
        entry = None if req.force else cache.lookup(key, hashes)
        if entry is not None:
            report.skipped.append(entry)
            log(f"{tag}: up to date, skipped")
            _release(module, req, last_use[id(module)] == n)
            continue
        fused_for = f", ORT-fused for {req.ort_optimize}" if req.ort_optimize != "none" else ""
        log(f"{tag}: building for {backend.name} {version} on {device}{fused_for} ...")
        t0 = time.perf_counter()
        job = BuildJob(bundle, r, req.device, Path(req.output), req.ort_optimize, req.check_load, req.weights_apart,
                       req.fp8_calibrate if req.fp8_scales == "static" else None)
        with cache.staging(key) as tmp:
            out = backend.build(job, tmp, log)
            entry = cache.commit(key, tmp)
        seconds = time.perf_counter() - t0
        report.built.append((entry, seconds))
        if out.exported is not None:
            report.exports[entry.digest] = out.exported
        if out.fused is not None:
            report.fused[entry.digest] = out.fused
        size = sum(f.size for f in entry.files)
        log(f"{tag}: done in {seconds:.1f} s, {size / 2**20:.1f} MiB")
        _release(module, req, last_use[id(module)] == n)
    record_model(cache, bundle, weights)  # for runtimes without the model's Python objects (libmegafusion)
    if req.remember_hashes and report.built:
        _remember_built(cache, report, hashes, log)
    hashes.save()
    return report


def _remember_built(cache: EngineCache, report: BuildReport, hashes: FileHashes, log) -> None:
    """Verifies the entries just built once their files are older than the racy window, so their hashes are
    remembered (a hash taken when a file was just written is not: a change within one tick of its times would
    pass unseen)."""
    newest = max((cache.root / f.path).stat().st_ctime_ns for e, _ in report.built for f in e.files) \
        if any(e.files for e, _ in report.built) else 0
    wait_ns = newest + file_hashes.RACY_NS - time.time_ns()
    if wait_ns > 0:
        time.sleep(wait_ns / 1e9 + 0.01)
    t0 = time.perf_counter()
    for e, _ in report.built:
        cache.verify(e, hashes)
    log(f"engine files verified and their hashes remembered in {time.perf_counter() - t0:.1f} s")



def _cast_in_place(bundle: ModelBundle, reqs: tuple[Requirement, ...], req: BuildRequest) -> None:
    """`release_weights`: each module that all its networks export at one dtype is cast to it in place, tensor
    by tensor, so export needs no cast copy (SDXL fp16: about 7 GB of weights in RAM instead of 14 + 5)."""
    dtypes: dict[int, set[torch.dtype]] = {}
    for r in reqs:  # the dtype each network is exported at (fp32 for an fp16 engine that ORT fuses)
        exported = exported_spec(bundle.family, r.spec, req.ort_optimize)
        dtypes.setdefault(id(bundle.module_for(r.spec.network)), set()).add(exported.outputs[0].torch_dtype)
    for r in reqs:
        module, want = bundle.module_for(r.spec.network), dtypes[id(bundle.module_for(r.spec.network))]
        if len(want) == 1 and module.dtype not in want:  # every floating tensor, as `cast_copy` casts them
            torch.nn.Module.to(module, dtype=next(iter(want)))  # (diffusers' own .to warns about fp32 modules)


def _release(module: torch.nn.Module, req: BuildRequest, last: bool) -> None:
    """`release_weights`: after a module's last network, its tensors go to the meta device (memory freed)."""
    if req.release_weights and last:
        module.to(device="meta")
        gc.collect()
