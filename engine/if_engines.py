"""Engines for DeepFloyd IF's two UNets in the content-addressed engine folder (engine/cache.py), built and opened
for the pixel pipeline (runtime/pixel_pipeline.py, through engine/if_networks.IFEngineNetworks).

Keys are the latent families' `EngineKey`s with IF's network names (`unet_I`, `unet_II`) and `if_unet_spec`'s
inputs in the profiles, so a folder may hold both kinds and verification, staging and commits are the cache's own.
Backends come from the registry (name, version, availability, and where their runners may be captured); what
each builds for IF is here, since `Backend.build` takes a latent `ModelBundle`: `onnxruntime` one ONNX file per
UNet, precision and dilation with dynamic sides (export/if_onnx.py), `aoti` one static package per stage shape
(export/if_aoti.py). TensorRT and the torch backend build no IF engines (the torch path is IFMegaFusionPipeline's
own modes).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.if_family import IFFamily
from ..core.if_loading import IFBundle
from ..core.plan import StagePlan
from ..core.specs import NetworkSpec, ShapeProfile
from .backend import NetworkExport, get_backend
from .cache import EngineCache, EngineError, EngineKey, device_name, weights_fingerprint
from .if_networks import IFEngineNetworks
from .runners import ShapeDispatch

IF_BACKENDS = ("onnxruntime", "aoti")
"""Backends that build IF engines."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class IFRequirement:
    """One IF engine to build: a UNet spec and the shape profiles it serves (one, static, for aoti)."""

    cascade: int
    spec: NetworkSpec
    profiles: tuple[ShapeProfile, ...]


def _shapes(spec: NetworkSpec, batch: int, h: int, w: int) -> dict[str, tuple[int, ...]]:
    axes = {"batch": batch, "image_height": h, "image_width": w}
    return {t.name: t.concrete(axes) for t in spec.inputs}


def if_requirements(family: IFFamily, plans: dict[int, StagePlan], precision: str, dilation: int, backend: str,
                    batch: int = 2) -> tuple[IFRequirement, ...]:
    """The engines `plans` (cascade stage -> plan) need at UNet batch `batch` (2: CFG): per cascade and dilation,
    one profile per stage shape (one engine over them, or one each where the backend compiles per shape: aoti)."""
    from ..export.if_onnx import if_unet_spec

    per_shape = get_backend(backend).one_engine_per_shape
    out = []
    for cascade, plan in sorted(plans.items()):
        by_dilation: dict[int, list[ShapeProfile]] = {}
        for k, s in enumerate(plan.stages):
            d = 1 if k == 0 else dilation
            spec = if_unet_spec(family, cascade, precision, d)
            shapes = _shapes(spec, batch, s.height, s.width)
            # Stage index 0 for a static package: it serves its shape in any plan, so the key is the shape.
            profile = ShapeProfile(0 if per_shape else k, tuple((n, x, x, x) for n, x in shapes.items()))
            if all(p.shapes != profile.shapes for p in by_dilation.setdefault(d, [])):
                by_dilation[d].append(profile)
        for d, profiles in sorted(by_dilation.items()):
            spec = if_unet_spec(family, cascade, precision, d)
            if per_shape:
                out += [IFRequirement(cascade, spec, (p,)) for p in profiles]
            else:
                out.append(IFRequirement(cascade, spec, tuple(profiles)))
    return tuple(out)


def _module(bundle: IFBundle, cascade: int) -> torch.nn.Module:
    m = bundle.unet_1 if cascade == 1 else bundle.unet_2
    if m is None:
        raise EngineError("a stage II engine needs the stage II UNet (give its folder too)")
    return m


def _check_backend(name: str, device: str) -> None:
    if name not in IF_BACKENDS:
        raise ValueError(f"backend {name!r} builds no IF engines; choose one of {', '.join(IF_BACKENDS)}")
    get_backend(name).check_available(device)


def build_if_engines(bundle: IFBundle, plans: dict[int, StagePlan], backend: str, precision: str, output,
                     dilation: int = 2, device: str = "cpu", force: bool = False, log: Log = lambda m: None) -> int:
    """Builds every UNet engine `plans` need into the folder `output`; returns how many were built (present, valid
    entries are kept)."""
    _check_backend(backend, device)
    b = get_backend(backend)
    cache = EngineCache(output)
    cache.entries()  # a corrupt manifest stops the build before any work
    reqs = if_requirements(bundle.family, plans, precision, dilation, backend)
    prints = {c: weights_fingerprint(_module(bundle, c)) for c in {r.cascade for r in reqs}}
    built = 0
    for n, r in enumerate(reqs, 1):
        s = r.spec
        key = EngineKey(bundle.family.name, prints[r.cascade], s.network, s.variant, s.dilation, s.precision,
                        r.profiles, backend, b.version(), device_name(device))
        sides = ", ".join(f"{p.shapes[0][1][3]}x{p.shapes[0][1][2]}" for p in r.profiles)
        tag = f"[{n}/{len(reqs)}] {s.name} ({s.variant}, {sides})"
        if not force and cache.lookup(key) is not None:
            log(f"{tag}: up to date, skipped")
            continue
        log(f"{tag}: building for {backend} {b.version()} on {device_name(device)} ...")
        with cache.staging(key) as tmp:
            res = _build_one(bundle, r, backend, tmp, device)
            entry = cache.commit(key, tmp)
        built += 1
        log(f"{tag}: done in {res.seconds:.1f} s, {sum(f.size for f in entry.files) / 2**20:.1f} MiB")
    return built


def _build_one(bundle: IFBundle, r: IFRequirement, backend: str, staging: Path, device: str):
    def aoti(path: Path, ctx):
        from ..export.if_aoti import export_if_aoti

        _, lo, _, _ = r.profiles[0].shapes[0]  # the package's sample: (batch, channels, height, width)
        return export_if_aoti(bundle, r.spec, path, lo[0], lo[2], lo[3], device=device, kernel_context=ctx)

    def onnx(path: Path):
        from ..export.if_onnx import export_if_unet

        return export_if_unet(bundle, r.spec, path, device=device)

    return get_backend(backend).export(NetworkExport(aoti=aoti, onnx=onnx), staging, device)


def open_if_engines(folder, bundle: IFBundle, device, precision: str | None = None,
                    backend: str | None = None) -> IFEngineNetworks:
    """The IF UNet engines in `folder` built from this bundle's weights for this device, verified, as
    IFEngineNetworks; EngineError naming what is missing or stale (and the command that builds it)."""
    from ..export.if_onnx import if_unet_spec

    device = torch.device(device)
    cache = EngineCache(folder)
    fam = bundle.family
    cascades = [c for c in (1, 2) if (bundle.unet_1 if c == 1 else bundle.unet_2) is not None]
    networks = {f"unet_{'I' * c}": c for c in cascades}
    mine = [e for e in cache.entries().values() if e.key.model == fam.name and e.key.network in networks
            and e.key.device == device_name(device) and e.key.backend in IF_BACKENDS
            and (precision is None or e.key.precision == precision) and (backend is None or e.key.backend == backend)]
    hint = (f"build them with mf-build-engines --model {fam.name} --backend aoti|onnxruntime --precision "
            f"{precision or 'fp32'} --device {device.type} --output {folder}")
    if not mine:
        raise EngineError(f"{folder} holds no {fam.name} UNet engines for {device_name(device)}"
                          f"{f' in {precision}' if precision else ''}; {hint}")
    chosen = backend or min({e.key.backend for e in mine}, key=lambda n: get_backend(n).preference.get(device.type, 9))
    prints = {c: weights_fingerprint(_module(bundle, c)) for c in cascades}
    runners: dict[tuple[str, int], list] = {}
    for e in sorted((e for e in mine if e.key.backend == chosen), key=lambda e: e.digest):
        if e.key.weights != prints[networks[e.key.network]]:
            raise EngineError(f"{e.key.describe()} in {folder} was built from other weights than this model's; "
                              f"rebuild: {hint}")
        if e.key.backend_version != get_backend(chosen).version():
            raise EngineError(f"{e.key.describe()} in {folder} was built by {chosen} {e.key.backend_version}, "
                              f"this is {get_backend(chosen).version()}; rebuild: {hint}")
        cache.verify(e)
        spec = if_unet_spec(fam, networks[e.key.network], e.key.precision, e.key.dilation)
        path = cache.root / e.files[0].path
        runner = get_backend(chosen).open_file(path, spec, device)
        runners.setdefault((e.key.network, e.key.dilation), []).append((e.key.profiles, runner))
    # An engine over all shapes (ONNX's dynamic sides) serves every stage; static packages are chosen by shape.
    per_shape = get_backend(chosen).one_engine_per_shape
    one = {k: ShapeDispatch(tuple(v)) if per_shape else v[0][1] for k, v in runners.items()}
    return IFEngineNetworks(one, device, chosen)
