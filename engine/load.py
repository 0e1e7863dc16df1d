"""Open built engines for a run: pick entries from the manifest, check that they cover the plan and match
the loaded weights, backend version and device, verify their files, and return `Networks`.

Nothing is used silently: a shape the engines do not cover, a stale entry and a corrupt file are errors
that name the range, the entry or the file, and the command that builds what is missing.
"""
from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.families import ModelFamily, get_family
from ..core.loading import ModelBundle
from ..core.plan import StagePlan
from ..core.specs import FP8, VAE_DECODER, VAE_ENCODER, NetworkSpec, ShapeProfile, network_spec, plan_requirements
from .backend import Backend, OpenContext, get_backend, registry
from .cache import EngineCache, EngineError, Entry, StaleEngineError, device_name
from .file_hashes import HASHES, FileHashes
from .fingerprint import WEIGHTS_SCHEME, network_fingerprint, scheme_of
from .fp8 import is_static_scheme, key_quantization
from .runners import EngineNetworks, Runner, ShapeDispatch


class CoverageError(EngineError):
    """The engines do not serve a shape (or network) the plan needs."""


def build_command(bundle: ModelBundle, plan: StagePlan, backend: str, precision: str, dilation: int,
                  engine_dir: Path, device: str = "cpu", ort_optimize: str = "none") -> str:
    """The mf-build-engines command that builds what this run needs: the same weights (the bundle's source),
    plan, backend, precision, dilation, device type and, for onnxruntime, fusion target. Without the weights'
    source, running it would report everything up to date and the same refusal would come back."""
    return _build_command(bundle.family, bundle.source, plan, backend, precision, dilation, engine_dir, device,
                          ort_optimize)


def _build_command(fam: ModelFamily, source: str, plan: StagePlan, backend: str, precision: str, dilation: int,
                   engine_dir: Path, device: str = "cpu", ort_optimize: str = "none", fp8_scales: str = "token") -> str:
    args = ["--model", fam.name]
    if source.startswith("random:"):  # `random:<seed>`, as build_random records it
        if not fam.tiny:  # tiny models are always random
            args.append("--random-weights")
        weights_seed = source.removeprefix("random:")
        if weights_seed != "0":
            args += ["--weights-seed", weights_seed]
    elif source != fam.hub_id:  # a folder (or another hub id) given with --model-path
        args += ["--model-path", source]
    args += ["--stages", ",".join(str(s) for s in plan.stages), "--backend", backend, "--precision", precision]
    if precision == FP8 and fp8_scales != "token":
        args += ["--fp8-scales", fp8_scales]
    if dilation == 1:
        args.append("--no-dilation")
    elif dilation != 2:
        args += ["--dilation", str(dilation)]
    args += ["--device", torch.device(device).type]
    if backend in registry():
        args += get_backend(backend).rebuild_args(ort_optimize)
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
    # FP8 engines only when asked for (--precision fp8 checks the GPU for FP8 tensor cores first)
    pairs = {p for p in pairs if p[1] == precision} if precision else {p for p in pairs if p[1] != FP8}
    if not pairs:
        return None
    known = registry()
    want_prec = "fp16" if device.type == "cuda" else "fp32"

    def rank(p: tuple[str, str]) -> tuple[int, bool]:
        b = known.get(p[0])
        return (b.preference.get(device.type, 9) if b else 10), p[1] != want_prec

    return min(pairs, key=rank)


@dataclass
class EngineSelection:
    """The entries that could serve a plan, picked from the manifest before any weights are loaded: per network
    and stage shape, the covering entries, best first. Which of them match the weights is `open_engines`'."""

    engine_dir: Path
    cache: EngineCache
    backend: Backend
    precision: str
    command: str
    """The mf-build-engines command that builds what is missing or stale."""
    needs: list[tuple[NetworkSpec, list[list[Entry]]]] = field(default_factory=list)
    """(network spec, [covering entries of each required profile, tightest and newest first])."""

    def modules_served(self) -> frozenset[str]:
        """The bundle components (core.loading.COMPONENTS) that engines run for every stage of the plan, so the
        model need not load their weights; none when the backend runs the torch modules themselves."""
        if self.backend.runs_modules:
            return frozenset()
        return frozenset("vae" if s.network in (VAE_DECODER, VAE_ENCODER) else s.network for s, _ in self.needs)


def select_engines(engine_dir: str | Path, family: ModelFamily, source: str, plan: StagePlan, dilation: int = 2,
                   relay: str = "pixel", device: torch.device | str = "cpu", backend: str | None = None,
                   precision: str | None = None, fp8_scales: str = "token") -> EngineSelection:
    """The entries of `engine_dir` that cover every network and stage shape of `plan`, chosen as `open_engines`
    chooses them; CoverageError naming what is missing and the build command (for weights from `source`, a
    bundle's `source`) before anything is loaded. `fp8_scales`: which FP8 UNet packages count (per-token or
    static input scales: the two are built apart, `mf-build-engines --fp8-scales`)."""
    engine_dir, device = Path(engine_dir), torch.device(device)
    cache = EngineCache(engine_dir)
    fam = family
    entries = [e for e in cache.entries().values() if e.key.model == fam.name]
    chosen_pair = _choose_backend(entries, device, backend, precision)
    if chosen_pair is None:
        if not precision and any(e.key.network == "unet" and e.key.precision == FP8
                                 and e.key.backend == (backend or e.key.backend) for e in entries):
            raise CoverageError(f"the {fam.name} UNet engines in {engine_dir} are FP8 ones: run them with "
                                "--precision fp8")
        asked = " ".join(x for x in (backend, precision) if x)
        # the first registered backend that builds the precision asked for
        name = backend or next((n for n, b in registry().items() if (precision or "fp32") in b.precisions),
                               "onnxruntime")
        cmd = _build_command(fam, source, plan, name, precision or "fp32", dilation, engine_dir, device.type,
                             _ort_optimize_hint(entries, name, device), fp8_scales)
        raise CoverageError(f"no {fam.name} {asked + ' ' if asked else ''}engines in {engine_dir}; "
                            f"build them with: {cmd}")
    backend_name, precision = chosen_pair
    backend = get_backend(backend_name)
    cmd = _build_command(fam, source, plan, backend_name, precision, dilation, engine_dir, device.type,
                         _ort_optimize_hint(entries, backend_name, device), fp8_scales)
    sel = EngineSelection(engine_dir, cache, backend, precision, cmd)
    for r in plan_requirements(fam, plan, precision, dilation, relay=relay):
        s = r.spec
        same = [e for e in entries if e.key.backend == backend_name and e.key.network == s.network
                and e.key.dilation == s.dilation
                and (e.key.precision == s.precision or s.network in (VAE_DECODER, VAE_ENCODER))
                and _scaling_of(e) == (fp8_scales if e.key.precision == FP8 else "token")]
        missing = [p for p in r.profiles if not any(_covers(e, p) for e in same)]
        if missing:
            have = sorted({px for e in same for px in backend.served_sizes(fam, s, e.key.profiles)})
            need = ", ".join(f"{st.width}x{st.height}" for st in (plan.stages[p.stage] for p in missing))
            what = f"{s.network} ({s.variant}, {_precision_text(s.precision, fp8_scales)})"
            covered = f"they cover {', '.join(have)}" if have else f"there is no {what} engine"
            raise CoverageError(f"the engines in {engine_dir} do not cover {what} at {need}; {covered}. "
                                f"Build them with: {cmd}")
        # per stage shape: one engine over all of them, or one per shape (static aoti)
        sel.needs.append((s, [sorted((e for e in same if _covers(e, p)), key=lambda e: (_span(e, p), -e.created))
                              for p in r.profiles]))
    return sel


def _precision_text(precision: str, fp8_scales: str) -> str:
    """A precision as refusals and descriptions name it: FP8 with static input scales says so."""
    return f"{precision}, static input scales" if precision == FP8 and fp8_scales == "static" else precision


def _scaling_of(e: Entry) -> str:
    """How an entry's FP8 layers scale their inputs: `static` (calibrated into the package) or `token`."""
    return "static" if is_static_scheme(e.key.quantization) else "token"


def _stale(e: Entry, fingerprint: str, installed: str, here: str, fp8_scales: str = "token") -> str:
    """Why entry `e` does not fit, for the refusal."""
    if e.key.weights != fingerprint:
        if scheme_of(e.key.weights) != WEIGHTS_SCHEME:
            return (f"weights fingerprint scheme {scheme_of(e.key.weights)} (this megafusion keys engines by scheme "
                    f"{WEIGHTS_SCHEME}: the weight files or the random-weights recipe)")
        return "other weights"
    if e.key.backend_version != installed:
        return f"{e.key.backend} {e.key.backend_version} (installed: {installed})"
    if e.key.device != here:
        return f"device {e.key.device!r} (this one: {here!r})"
    want = key_quantization(e.key.network, e.key.precision, fp8_scales)
    return f"FP8 layers {e.key.quantization!r} (this megafusion builds {want!r})"


def open_engines(engine_dir: str | Path, bundle: ModelBundle, plan: StagePlan, dilation: int = 2,
                 relay: str = "pixel", device: torch.device | str = "cpu", backend: str | None = None,
                 precision: str | None = None, conv_algo_search: str = "EXHAUSTIVE",
                 ort_unet_graphs: bool = False, timings: dict[str, float] | None = None,
                 unopened: frozenset[str] = frozenset(), fp8_scales: str = "token") -> tuple[EngineNetworks, str]:
    """Networks that run `plan` from the engines in `engine_dir`, and a one-line description of them.

    Each entry's weights fingerprint must be the bundle's (engine/fingerprint.py: from the weights' origin, so
    components built without weights, `load_model(skip=)`, check too), its backend version and device this
    one's; its files are verified, by hashes remembered in the folder where their stat is unchanged.
    ONNX Runtime on CUDA: `conv_algo_search` is the EP's cuDNN algorithm search; `ort_unet_graphs` runs the
    UNets through one ORT CUDA graph per input shape (replays skip the EP's per-shape set-up). `timings`, if
    given, receives the seconds of each phase: `fingerprint`, `verify`, `open`. `unopened`: networks the run calls
    elsewhere (with --controlnet the controlled-UNet engines replace the plain UNet's): their entries are chosen,
    so the backend and precision are the plan's, but neither verified nor opened (SDXL's UNet engines hold about
    10 GB of device memory); each stands as an `Unopened` runner that refuses to run."""
    t0 = time.perf_counter()
    device = torch.device(device)
    sel = select_engines(engine_dir, bundle.family, bundle.source, plan, dilation, relay, device, backend,
                         precision, fp8_scales)
    engine_dir, backend = sel.engine_dir, sel.backend
    installed, here = backend.version(), device_name(device)
    hashes = FileHashes(engine_dir / HASHES)
    by_component: dict[str, str] = {}  # both VAE halves are one component: fingerprinted once
    for s, _ in sel.needs:
        if bundle.component(s.network) not in by_component:
            by_component[bundle.component(s.network)] = network_fingerprint(bundle, s.network, hashes)
    t1 = time.perf_counter()
    chosen: dict[tuple[str, int], list[Entry]] = {}
    for s, per_profile in sel.needs:
        if s.network in unopened:
            continue
        fingerprint = by_component[bundle.component(s.network)]
        picked: list[Entry] = []
        for fits in per_profile:
            valid = [e for e in fits if e.key.weights == fingerprint and e.key.backend_version == installed
                     and e.key.device == here
                     and e.key.quantization == key_quantization(s.network, s.precision, fp8_scales)]
            if not valid:
                e = fits[0]
                raise StaleEngineError(f"engine {e.key.describe()} (entry {e.digest[:16]}) in {engine_dir} was built "
                                       f"for {_stale(e, fingerprint, installed, here, fp8_scales)}; rebuild with: "
                                       f"{sel.command}")
            if valid[0] not in picked:
                sel.cache.verify(valid[0], hashes)
                picked.append(valid[0])
        chosen[(s.network, s.dilation)] = picked
    hashes.save()
    t2 = time.perf_counter()
    ctx = OpenContext(bundle.family, device, bundle, conv_algo_search, ort_unet_graphs)
    runners = {k: _one_runner([open_entry(engine_dir, e, backend, ctx) for e in es], es) for k, es in chosen.items()}
    runners.update({(s.network, s.dilation): Unopened(s) for s, _ in sel.needs if s.network in unopened})
    if timings is not None:
        timings.update(fingerprint=t1 - t0, verify=t2 - t1, open=time.perf_counter() - t2)
    networks = EngineNetworks(runners, device, backend.name)
    networks.weights = {network: es[0].key.weights for (network, _), es in chosen.items()}
    # The controlled UNet's engines are keyed by the plain UNet's fingerprint: hashed once, here.
    networks.weights.update({s.network: by_component[bundle.component(s.network)] for s, _ in sel.needs
                             if s.network in unopened})
    return networks, f"{backend.name} engines ({_precision_text(sel.precision, fp8_scales)}) from {engine_dir}"


def open_entry(engine_dir: Path, e: Entry, backend: Backend, ctx: OpenContext) -> Runner:
    """A runner for one verified entry of `engine_dir`."""
    spec = network_spec(get_family(e.key.model), e.key.network, e.key.precision, e.key.dilation)
    path = engine_dir / e.files[0].path if e.files else None
    return backend.open(e, path, spec, ctx)


class Unopened:
    """A network of the plan that `open_engines` left closed (`unopened`): it keeps the spec (the dtypes the
    pipeline reads) and refuses to run, naming why."""

    capturable = True

    def __init__(self, spec: NetworkSpec):
        self.spec = spec

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise RuntimeError(f"{self.spec.name}: this run left its engines unopened (another network runs in its "
                           "place)")
