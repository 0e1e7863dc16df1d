"""Open built engines for a run: pick entries from the manifest, check that they cover the plan and match
the loaded weights, backend version and device, verify their files, and return `Networks`.

Nothing is used silently: a shape the engines do not cover, a stale entry and a corrupt file are errors
that name the range, the entry or the file, and the command that builds what is missing.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megafusion.export.aoti_export import describe_range
from megafusion.export.loading import ModelBundle
from megafusion.export.models import get_family
from megafusion.export.onnx_export import source_module
from megafusion.export.plan import StagePlan
from megafusion.export.specs import (VAE_DECODER, VAE_ENCODER, NetworkSpec, Requirement, network_spec,
                                     plan_requirements, profile_sizes)

from .build import backend_version, device_name
from .cache import EngineCache, EngineError, Entry, StaleEngineError, weights_fingerprint
from .networks import Networks, TorchNetworks
from .runners import EngineNetworks


class CoverageError(EngineError):
    """The engines do not serve a shape (or network) the plan needs."""


def build_command(bundle: ModelBundle, plan: StagePlan, backend: str, precision: str, dilation: int,
                  engine_dir: Path) -> str:
    stages = ",".join(str(s) for s in plan.stages)
    extra = " --no-dilation" if dilation == 1 else ("" if dilation == 2 else f" --dilation {dilation}")
    return (f"mf-build-engines --model {bundle.family.name} --stages {stages} --backend {backend} "
            f"--precision {precision}{extra} --output {engine_dir}")


def _covers(entry: Entry, r: Requirement) -> bool:
    """Each required stage's whole batch range lies inside one of the entry's profiles."""
    for need in r.profiles:
        ok = any(all(have.covers(n, lo) and have.covers(n, hi) for n, lo, _, hi in need.shapes)
                 for have in entry.key.profiles)
        if not ok:
            return False
    return True


def _choose_backend(entries: list[Entry], device: torch.device, backend: str | None,
                    precision: str | None) -> tuple[str, str] | None:
    """(backend, precision) to run: as asked, else the device's best among the UNet engines present."""
    pairs = {(e.key.backend, e.key.precision) for e in entries if e.key.network == "unet"}  # VAEs may be fp32
    if backend:
        pairs = {p for p in pairs if p[0] == backend}
    if precision:
        pairs = {p for p in pairs if p[1] == precision}
    if not pairs:
        return None
    order = (["tensorrt", "onnxruntime", "aoti", "torch"] if device.type == "cuda"
             else ["onnxruntime", "aoti", "torch", "tensorrt"])
    want_prec = "fp16" if device.type == "cuda" else "fp32"
    return min(pairs, key=lambda p: (order.index(p[0]) if p[0] in order else 9, p[1] != want_prec))


def open_engines(engine_dir: str | Path, bundle: ModelBundle, plan: StagePlan, dilation: int = 2,
                 relay: str = "pixel", device: torch.device | str = "cpu", backend: str | None = None,
                 precision: str | None = None, conv_algo_search: str = "EXHAUSTIVE",
                 ort_unet_graphs: bool = False) -> tuple[Networks, str]:
    """Networks that run `plan` from the engines in `engine_dir`, and a one-line description of them.

    ONNX Runtime on CUDA: `conv_algo_search` is the EP's cuDNN algorithm search; `ort_unet_graphs` runs the
    UNets through one ORT CUDA graph per input shape (replays skip the EP's per-shape set-up)."""
    engine_dir, device = Path(engine_dir), torch.device(device)
    cache = EngineCache(engine_dir)
    fam = bundle.family
    entries = [e for e in cache.entries().values() if e.key.model == fam.name]
    chosen_pair = _choose_backend(entries, device, backend, precision)
    if chosen_pair is None:
        asked = " ".join(x for x in (backend, precision) if x)
        cmd = build_command(bundle, plan, backend or "onnxruntime", precision or "fp32", dilation, engine_dir)
        raise CoverageError(f"no {fam.name} {asked + ' ' if asked else ''}engines in {engine_dir}; "
                            f"build them with: {cmd}")
    backend, precision = chosen_pair
    cmd = build_command(bundle, plan, backend, precision, dilation, engine_dir)
    installed, here = backend_version(backend), device_name(device)
    chosen: dict[tuple[str, int], Entry] = {}
    fingerprints: dict[int, str] = {}
    for r in plan_requirements(fam, plan, precision, dilation, relay=relay):
        s = r.spec
        same = [e for e in entries if e.key.backend == backend and e.key.network == s.network
                and e.key.dilation == s.dilation
                and (e.key.precision == precision or s.network in (VAE_DECODER, VAE_ENCODER))]
        fits = sorted((e for e in same if _covers(e, r)), key=lambda e: -e.created)
        if not fits:
            have = sorted({px for e in same for px in _served_sizes(e, s)})
            need = ", ".join(f"{st.width}x{st.height}" for st in (plan.stages[p.stage] for p in r.profiles))
            what = f"{s.network} ({s.variant}, {s.precision})"
            covered = f"they cover {', '.join(have)}" if have else f"there is no {what} engine"
            raise CoverageError(f"the engines in {engine_dir} do not cover {what} at {need}; {covered}. "
                                f"Build them with: {cmd}")
        module = source_module(bundle, s)
        if id(module) not in fingerprints:  # both VAE halves hash one module
            fingerprints[id(module)] = weights_fingerprint(module)
        fingerprint = fingerprints[id(module)]
        valid = [e for e in fits if e.key.weights == fingerprint and e.key.backend_version == installed
                 and e.key.device == here]
        if not valid:
            e = fits[0]
            why = ("other weights" if e.key.weights != fingerprint else
                   f"{backend} {e.key.backend_version} (installed: {installed})" if e.key.backend_version != installed
                   else f"device {e.key.device!r} (this one: {here!r})")
            raise StaleEngineError(f"engine {e.key.describe()} in {engine_dir} was built for {why}; "
                                   f"rebuild with: {cmd}")
        cache.verify(valid[0])
        chosen[(s.network, s.dilation)] = valid[0]
    desc = f"{backend} engines ({precision}) from {engine_dir}"
    if backend == "torch":  # the modules themselves, cast as the entries were recorded
        dtypes = {"fp16": torch.float16, "fp32": torch.float32}
        for m in (bundle.unet, *bundle.text_encoders):
            m.to(device=device, dtype=dtypes[precision])
        bundle.vae.to(device=device)
        return TorchNetworks(bundle, dtypes[chosen[(VAE_DECODER, 1)].key.precision]), desc
    runners = {k: _runner(engine_dir, e, fam.vae_scale, device, conv_algo_search, ort_unet_graphs and k[0] == "unet")
               for k, e in chosen.items()}
    return EngineNetworks(runners, device), desc


def _served_sizes(e: Entry, spec: NetworkSpec) -> list[str]:
    """Pixel sizes an entry serves: one per profile, or the range of an AOTInductor package."""
    fam = get_family(e.key.model)
    if e.key.backend == "aoti":
        return [d for p in e.key.profiles if (d := describe_range(fam, spec, p))]  # none for fixed shapes
    return profile_sizes(e.key.network, e.key.profiles, fam.vae_scale)


def _runner(engine_dir: Path, e: Entry, vae_scale: int, device: torch.device, conv_algo_search: str = "EXHAUSTIVE",
            cuda_graph: bool = False):
    spec = network_spec(get_family(e.key.model), e.key.network, e.key.precision, e.key.dilation)
    path = engine_dir / e.files[0].path
    if e.key.backend == "aoti":
        from .aoti_backend import AotiRunner

        return AotiRunner(path, spec, e.key.profiles[0], e.key.model, device)
    if e.key.backend == "onnxruntime":
        from .onnxruntime_backend import OrtRunner

        # The VAE runs a few times per generation with transients of tens of GB at 2048 px (fp32 mid-block
        # attention); each session's arena would keep its peak, so encoder and decoder give theirs back.
        return OrtRunner(path, spec, vae_scale, device, cuda_graph=cuda_graph,
                         shrink_arena=e.key.network in (VAE_DECODER, VAE_ENCODER), conv_algo_search=conv_algo_search)
    from .tensorrt_backend import TrtRunner

    return TrtRunner(path, spec, e.key.profiles, device)
