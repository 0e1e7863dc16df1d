"""ONNX Runtime engines of the SD3 and FLUX transformers in the content-addressed engine folder (engine/cache.py).

One dynamic engine per model, precision, transformer batch range and device: the exports of export/dit_onnx_export.py
(SD3: dynamic batch, height, width) and export/dit_flux_export.py (FLUX: dynamic batch and token count, the rotary
tables as inputs) serve every stage shape, so the entry's one `ShapeProfile` records the range the build was asked
for (min/opt/max latent sides of the plan, batch 1 to the spec's CFG batch) and the runtime refuses a plan outside
it, as engine/dit_engines.py refuses a stage shape without a package. Keys are the aoti packages' (weights
fingerprint, precision, profile, backend name and version, device); the backend object comes from the registry
(engine/backend.py) and declares what opening needs (its runners' `capturable`, `capture_note`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from ..core.dit_families import DiTFamily
from ..core.dit_loading import DiTBundle
from ..core.dit_specs import TRANSFORMER
from ..core.plan import StagePlan
from ..core.specs import NetworkSpec, ShapeProfile, latent_range
from .backend import Backend, get_backend
from .cache import EngineCache, EngineError, EngineKey, device_name, weights_fingerprint
from .dit_engines import check_entry, transformer_entries, transformer_hint
from .flow_networks import FlowTorchNetworks
from .runners import ShapeDispatch

BACKEND_NAME = "onnxruntime"
"""The registry name of the backend that runs these engines (its object decides everything else)."""

Log = Callable[[str], None]


def _backend() -> Backend:
    return get_backend(BACKEND_NAME)


def _guidance_embeds(bundle: DiTBundle) -> bool:
    return bool(getattr(bundle.transformer.config, "guidance_embeds", False))


def dit_onnx_spec(family: DiTFamily, precision: str, guidance_embeds: bool = True) -> NetworkSpec:
    """The exported transformer's spec in `precision` (the backend's precisions: fp32, fp16); ValueError otherwise."""
    from ..export.dit_aoti import dit_spec

    b = _backend()
    if precision not in b.precisions:
        raise ValueError(f"precision {precision!r}: {b.name} transformer engines are {', '.join(b.precisions)}")
    return dit_spec(family, precision, guidance_embeds)


def dit_range_profile(family: DiTFamily, spec: NetworkSpec, plan: StagePlan, batch: int) -> ShapeProfile:
    """min: batch 1 at the plan's smallest latent side (square); opt: `batch` at stage 1's size; max: the larger of
    `batch` and the spec's CFG batch at the plan's largest side (square). FLUX's axes are tokens: a stage is inside
    when its token count is (any stage with both sides in the range is)."""
    from ..export.dit_aoti import dit_axes

    lo, hi = latent_range(family, plan)
    s1 = plan.stages[0]
    points = [dit_axes(family, 1, lo, lo),
              dit_axes(family, batch, s1.height // family.vae_scale, s1.width // family.vae_scale),
              dit_axes(family, max(batch, spec.batch_range[2]), hi, hi)]
    return ShapeProfile(0, tuple((t.name, *(t.concrete(a) for a in points)) for t in spec.inputs))


def describe_dit_range(family: DiTFamily, profile: ShapeProfile) -> str:
    """The pixel sizes an entry serves, e.g. '128x128 to 256x256 at batch 1 to 2' (FLUX: by token count)."""
    _, lo, _, hi = profile.shapes[0]  # hidden_states: (B, C, h, w) for SD3, (B, tokens, C) for FLUX
    s = family.vae_scale
    if family.kind == "sd3":
        sides = f"{lo[3] * s}x{lo[2] * s} to {hi[3] * s}x{hi[2] * s}"
    else:
        a, b = (2 * math.isqrt(t) * s for t in (lo[1], hi[1]))
        sides = f"{lo[1]} to {hi[1]} latent tokens ({a}x{a} to {b}x{b})"
    return f"{sides} at batch {lo[0]} to {hi[0]}"


def _key(family: DiTFamily, spec: NetworkSpec, profile: ShapeProfile, weights: str, device: str) -> EngineKey:
    b = _backend()
    return EngineKey(family.name, weights, spec.network, spec.variant, spec.dilation, spec.precision, (profile,),
                     b.name, b.version(), device_name(device))


def build_dit_onnx_engine(bundle: DiTBundle, plan: StagePlan, precision: str, output, batch: int,
                          device: str = "cpu", force: bool = False, log: Log = lambda m: None) -> int:
    """Exports the transformer to ONNX into the folder `output`, one dynamic engine whose profile covers every stage
    shape of `plan` at transformer batch `batch`; returns 1 if built, 0 if a valid entry was already there."""
    from ..export.dit_flux_export import export_flux_transformer
    from ..export.dit_onnx_export import export_sd3_transformer
    from .onnxruntime_backend import OrtRunner

    b = _backend()
    b.check_available(device)
    fam = bundle.family
    spec = dit_onnx_spec(fam, precision, _guidance_embeds(bundle))
    cache = EngineCache(output)
    cache.entries()  # a corrupt manifest stops the build before any work
    profile = dit_range_profile(fam, spec, plan, batch)
    key = _key(fam, spec, profile, weights_fingerprint(bundle.transformer), device)
    tag = f"[1/1] {spec.name} ({describe_dit_range(fam, profile)})"
    if not force and cache.lookup(key) is not None:
        log(f"{tag}: up to date, skipped")
        return 0
    log(f"{tag}: building for {b.name} {key.backend_version} on {key.device} ...")
    t0 = time.perf_counter()
    with cache.staging(key) as tmp:
        if fam.kind == "sd3":
            files = export_sd3_transformer(bundle, tmp / "model.onnx", precision)
        else:
            files = export_flux_transformer(bundle, tmp / "model.onnx", precision)
        OrtRunner(files[0], spec, fam.vae_scale, device, optimization="basic")  # opens: the inputs are the spec's
        entry = cache.commit(key, tmp)
    log(f"{tag}: done in {time.perf_counter() - t0:.1f} s, {sum(f.size for f in entry.files) / 2**20:.1f} MiB")
    return 1


def build_hint(family: DiTFamily, folder, device: torch.device, precision: str) -> str:
    return transformer_hint(family, folder, device, precision, BACKEND_NAME, "it")


def _entries(folder, family: DiTFamily, device: torch.device, precision: str) -> list:
    return transformer_entries(folder, family, device, precision, BACKEND_NAME, f"{BACKEND_NAME} transformer engine",
                               "it")


def _covers(family: DiTFamily, profile: ShapeProfile, plan: StagePlan, batch: int) -> bool:
    from ..export.dit_aoti import dit_axes, dit_spec

    spec = dit_spec(family, "fp32")  # shapes only; every input, guidance too (an entry without it does not list it)
    for s in plan.stages:
        axes = dit_axes(family, batch, s.height // family.vae_scale, s.width // family.vae_scale)
        shapes = {t.name: t.concrete(axes) for t in spec.inputs}
        if not all(profile.covers(n, shapes[n]) for n, *_ in profile.shapes):
            return False
    return True


def check_dit_onnx_engine(folder, family: DiTFamily, plan: StagePlan, device, precision: str, batch: int) -> None:
    """Before any model load: EngineError unless `folder` holds an engine whose profile covers every stage of
    `plan` at transformer batch `batch`, naming the ranges it holds and the build command otherwise."""
    device = torch.device(device)
    mine = _entries(folder, family, device, precision)
    if any(_covers(family, p, plan, batch) for e in mine for p in e.key.profiles):
        return
    held = "; ".join(describe_dit_range(family, p) for e in mine for p in e.key.profiles)
    guidance = " --guidance 1" if batch == 1 and family.cfg else ""
    sizes = ", ".join(f"{s.width}x{s.height}" for s in plan.stages)
    raise EngineError(f"the {family.name} {BACKEND_NAME} transformer engine in {folder} serves {held}, not this "
                      f"plan's stages {sizes} at batch {batch}; {build_hint(family, folder, device, precision)} "
                      f"--stages/--size as this plan{guidance}")


def open_dit_onnx_engine(folder, bundle: DiTBundle, device, precision: str):
    """The transformer engine in `folder` built from this bundle's weights for this device in `precision`, verified,
    as an `EngineTransformer` (engine/dit_engines.py); EngineError naming what is missing or stale."""
    from .dit_engines import EngineTransformer

    device = torch.device(device)
    fam, b = bundle.family, _backend()
    cache = EngineCache(folder)
    hint = build_hint(fam, folder, device, precision)
    weights, version = weights_fingerprint(bundle.transformer), b.version()
    spec = dit_onnx_spec(fam, precision, _guidance_embeds(bundle))
    engines = []
    for e in sorted(_entries(folder, fam, device, precision), key=lambda e: e.digest):
        check_entry(e, folder, weights, b.name, version, hint)
        cache.verify(e)
        runner = b.open(e, cache.root / e.files[0].path, spec, _open_context(fam, device))
        engines.append((e.key.profiles, runner))
    # ShapeDispatch refuses a shape outside every entry's profile (the sessions would run it, unverified).
    return EngineTransformer(ShapeDispatch(tuple(engines)), fam.kind,
                             bundle.transformer.pos_embed if fam.kind == "flux" else None)


def _open_context(family: DiTFamily, device: torch.device):
    from .backend import OpenContext

    return OpenContext(family, device)


def onnx_engine_networks(bundle: DiTBundle, folder, device, precision: str,
                         vae_dtype: torch.dtype | None = None, loras=()) -> FlowTorchNetworks:
    """`FlowTorchNetworks` whose transformer runs from the ONNX Runtime engine in `folder`; `capturable` is the
    backend's runners' (False: its sessions bind their own CUDA stream). No LoRA (`takes_lora` False)."""
    if loras:
        raise EngineError("onnxruntime transformer engines take no LoRA yet; use aoti packages")
    nets = FlowTorchNetworks(bundle, vae_dtype)
    engine = open_dit_onnx_engine(folder, bundle, device, precision)
    nets.transformer_fn = engine
    nets.capturable = engine.capturable
    return nets
