"""Open built engines for a run: pick entries from the manifest, check that they cover the plan and match
the loaded weights, backend version and device, verify their files, and return `Networks`.

Nothing is used silently: a shape the engines do not cover, a stale entry and a corrupt file are errors
that name the range, the entry or the file, and the command that builds what is missing.
"""
from __future__ import annotations

import math
import shlex
from pathlib import Path

import torch

from ..core.families import get_family
from ..core.loading import ModelBundle
from ..core.plan import StagePlan
from ..core.specs import VAE_DECODER, VAE_ENCODER, ShapeProfile, network_spec, plan_requirements
from .backend import Backend, OpenContext, get_backend, registry
from .cache import EngineCache, EngineError, Entry, StaleEngineError, device_name, weights_fingerprint
from .runners import EngineNetworks, Runner, ShapeDispatch


class CoverageError(EngineError):
    """The engines do not serve a shape (or network) the plan needs."""


def build_command(bundle: ModelBundle, plan: StagePlan, backend: str, precision: str, dilation: int,
                  engine_dir: Path, device: str = "cpu", ort_optimize: str = "none") -> str:
    """The mf-build-engines command that builds what this run needs: the same weights (the bundle's source),
    plan, backend, precision, dilation, device type and, for onnxruntime, fusion target. Without the weights'
    source, running it would report everything up to date and the same refusal would come back."""
    fam = bundle.family
    args = ["--model", fam.name]
    if bundle.source.startswith("random:"):  # `random:<seed>`, as build_random records it
        if not fam.tiny:  # tiny models are always random
            args.append("--random-weights")
        weights_seed = bundle.source.removeprefix("random:")
        if weights_seed != "0":
            args += ["--weights-seed", weights_seed]
    elif bundle.source != fam.hub_id:  # a folder (or another hub id) given with --model-path
        args += ["--model-path", bundle.source]
    args += ["--stages", ",".join(str(s) for s in plan.stages), "--backend", backend, "--precision", precision]
    if dilation == 1:
        args.append("--no-dilation")
    elif dilation != 2:
        args += ["--dilation", str(dilation)]
    args += ["--device", torch.device(device).type]
    if backend == "onnxruntime":
        args += ["--ort-optimize", ort_optimize]
    args += ["--output", str(engine_dir)]
    return "mf-build-engines " + shlex.join(args)


def _ort_optimize_hint(entries: list[Entry], backend: str, device: torch.device) -> str:
    """The fusion target a rebuild should ask for: that of this backend's newest entry where it suits the device
    (keeps the user's earlier choice), else the backend's default for the device."""
    newest = sorted((e for e in entries if e.key.backend == backend), key=lambda e: -e.created)
    if newest and newest[0].key.ort_optimize in ("none", device.type):
        return newest[0].key.ort_optimize
    return get_backend(backend).default_ort_optimize(device.type) if backend in registry() else "none"


def _covers(entry: Entry, need: ShapeProfile) -> bool:
    """The required stage's whole batch range lies inside one of the entry's profiles."""
    return any(all(have.covers(n, lo) and have.covers(n, hi) for n, lo, _, hi in need.shapes)
               for have in entry.key.profiles)


def _span(entry: Entry, need: ShapeProfile) -> int:
    """How many elements wider than `need` the entry's tightest covering profile is: a static engine for exactly
    this shape (0 beyond the batch range) is preferred to a range that also covers it."""
    spans = [sum(math.prod(hi) - math.prod(lo) for _, lo, _, hi in have.shapes)
             for have in entry.key.profiles
             if all(have.covers(n, lo) and have.covers(n, hi) for n, lo, _, hi in need.shapes)]
    return min(spans)


def _one_runner(runners: list[Runner], entries: list[Entry]) -> Runner:
    """The entry's runner, or one that dispatches each call by shape over the entries of one network."""
    if len(runners) == 1:
        return runners[0]
    return ShapeDispatch(tuple((e.key.profiles, r) for e, r in zip(entries, runners)))


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
    known = registry()
    want_prec = "fp16" if device.type == "cuda" else "fp32"

    def rank(p: tuple[str, str]) -> tuple[int, bool]:
        b = known.get(p[0])
        return (b.preference.get(device.type, 9) if b else 10), p[1] != want_prec

    return min(pairs, key=rank)


def open_engines(engine_dir: str | Path, bundle: ModelBundle, plan: StagePlan, dilation: int = 2,
                 relay: str = "pixel", device: torch.device | str = "cpu", backend: str | None = None,
                 precision: str | None = None, conv_algo_search: str = "EXHAUSTIVE",
                 ort_unet_graphs: bool = False) -> tuple[EngineNetworks, str]:
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
        name = backend or "onnxruntime"
        cmd = build_command(bundle, plan, name, precision or "fp32", dilation, engine_dir, device.type,
                            _ort_optimize_hint(entries, name, device))
        raise CoverageError(f"no {fam.name} {asked + ' ' if asked else ''}engines in {engine_dir}; "
                            f"build them with: {cmd}")
    backend_name, precision = chosen_pair
    backend = get_backend(backend_name)
    cmd = build_command(bundle, plan, backend_name, precision, dilation, engine_dir, device.type,
                        _ort_optimize_hint(entries, backend_name, device))
    installed, here = backend.version(), device_name(device)
    chosen: dict[tuple[str, int], list[Entry]] = {}
    fingerprints: dict[int, str] = {}
    for r in plan_requirements(fam, plan, precision, dilation, relay=relay):
        s = r.spec
        same = [e for e in entries if e.key.backend == backend_name and e.key.network == s.network
                and e.key.dilation == s.dilation
                and (e.key.precision == precision or s.network in (VAE_DECODER, VAE_ENCODER))]
        missing = [p for p in r.profiles if not any(_covers(e, p) for e in same)]
        if missing:
            have = sorted({px for e in same for px in backend.served_sizes(fam, s, e.key.profiles)})
            need = ", ".join(f"{st.width}x{st.height}" for st in (plan.stages[p.stage] for p in missing))
            what = f"{s.network} ({s.variant}, {s.precision})"
            covered = f"they cover {', '.join(have)}" if have else f"there is no {what} engine"
            raise CoverageError(f"the engines in {engine_dir} do not cover {what} at {need}; {covered}. "
                                f"Build them with: {cmd}")
        module = bundle.module_for(s.network)
        if id(module) not in fingerprints:  # both VAE halves hash one module
            fingerprints[id(module)] = weights_fingerprint(module)
        fingerprint = fingerprints[id(module)]
        picked: list[Entry] = []
        for p in r.profiles:  # per stage shape: one engine over all of them, or one per shape (static aoti)
            fits = sorted((e for e in same if _covers(e, p)), key=lambda e: (_span(e, p), -e.created))
            valid = [e for e in fits if e.key.weights == fingerprint and e.key.backend_version == installed
                     and e.key.device == here]
            if not valid:
                e = fits[0]
                why = ("other weights" if e.key.weights != fingerprint else
                       f"{backend_name} {e.key.backend_version} (installed: {installed})"
                       if e.key.backend_version != installed else f"device {e.key.device!r} (this one: {here!r})")
                raise StaleEngineError(f"engine {e.key.describe()} in {engine_dir} was built for {why}; "
                                       f"rebuild with: {cmd}")
            if valid[0] not in picked:
                cache.verify(valid[0])
                picked.append(valid[0])
        chosen[(s.network, s.dilation)] = picked
    ctx = OpenContext(fam, device, bundle, conv_algo_search, ort_unet_graphs)
    runners = {k: _one_runner([open_entry(engine_dir, e, backend, ctx) for e in es], es) for k, es in chosen.items()}
    networks = EngineNetworks(runners, device, backend_name)
    networks.weights = {network: es[0].key.weights for (network, _), es in chosen.items()}
    return networks, f"{backend_name} engines ({precision}) from {engine_dir}"


def open_entry(engine_dir: Path, e: Entry, backend: Backend, ctx: OpenContext) -> Runner:
    """A runner for one verified entry of `engine_dir`."""
    spec = network_spec(get_family(e.key.model), e.key.network, e.key.precision, e.key.dilation)
    path = engine_dir / e.files[0].path if e.files else None
    return backend.open(e, path, spec, ctx)
