"""ControlNet engines (issue #18 item 1): build the ControlNet and controlled-UNet networks of a plan into an engine
folder, and open them for a run.

Entries sit in the same content-addressed cache as the plan's other engines. A ControlNet's key holds its own
weights fingerprint, so several ControlNets (and the same ControlNet under other weights) each get their own
entries; the controlled UNet's key holds the UNet's. The aoti backend builds one static package per network and
stage shape (as for the UNet), onnxruntime one model over the plan's stage profiles.
"""
from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..core.controlnet_specs import CONTROLNET, UNET_CONTROLLED, ControlSpec, controlnet_requirements
from ..core.families import ModelFamily
from ..core.loading import ModelBundle
from ..core.plan import StagePlan
from ..core.specs import Requirement, profile_sizes
from .backend import Backend, NetworkExport, OpenContext, get_backend
from .build import BuildReport, BuildRequest, check_request
from .cache import EngineCache, EngineKey, Entry, StaleEngineError, device_name
from .file_hashes import HASHES, FileHashes
from .fingerprint import loaded_fingerprint, network_fingerprint
from .load import CoverageError, _covers, _span, build_command
from .runners import Runner, ShapeDispatch

CONTROL_BACKENDS = ("aoti", "onnxruntime")
"""Backends that build ControlNet engines."""

CONTROL_SELECTORS = frozenset(f"{n}{v}" for n in (CONTROLNET, UNET_CONTROLLED) for v in ("", "-standard", "-dilated"))
"""What `mf-build-engines --networks` takes for these networks: a network, or one variant of it."""


def selected(spec, networks: Sequence[str]) -> bool:
    """Whether `networks` (CONTROL_SELECTORS; empty: all) selects `spec`."""
    return not networks or spec.network in networks or f"{spec.network}-{spec.variant}" in networks


def check_control_request(req: BuildRequest, flag: str = "--controlnet") -> None:
    """ValueError naming an option the engines of `flag` (ControlNet, IP-Adapter: static per stage shape, aoti or
    onnxruntime) do not take."""
    if req.backend not in CONTROL_BACKENDS:
        raise ValueError(f"{flag} engines are built for {' and '.join(CONTROL_BACKENDS)}, not {req.backend}")
    if req.dynamic:
        raise ValueError(f"{flag} engines are static per stage shape; leave out --dynamic")


def start_build(req: BuildRequest, flag: str) -> tuple[object, EngineCache, str, str]:
    """(backend, cache, backend version, device name) for a build of `flag`'s engines, its request checked and the
    folder's manifest read first (a corrupt one stops the build before any work)."""
    check_control_request(req, flag)
    backend = check_request(req)
    cache = EngineCache(req.output)
    cache.entries()
    return backend, cache, backend.version(), device_name(req.device)


def _jobs(bundle: ModelBundle, plan: StagePlan, controlnets: Sequence[torch.nn.Module], precision: str,
          dilation: int, hashes: FileHashes, unet_fp: str | None = None,
          ) -> list[tuple[torch.nn.Module, str, Requirement]]:
    """(module, weights fingerprint, requirement) per network: each ControlNet's, then the controlled UNet's
    (`unet_fp`: the UNet's fingerprint where the caller has it)."""
    fam, out = bundle.family, []
    unet_fp = unet_fp or network_fingerprint(bundle, "unet", hashes)  # the key the plain UNet engines get
    for i, cn in enumerate(controlnets):
        fp = loaded_fingerprint(cn, hashes)
        for r in controlnet_requirements(fam, plan, cn.config, precision, dilation):
            if r.spec.network == CONTROLNET:
                out.append((cn, fp, r))
            elif i == 0:
                out.append((bundle.unet, unet_fp, r))
    return out


def control_key(bundle: ModelBundle, r: Requirement, backend: str, version: str, device: str,
                fingerprint: str, ort_optimize: str = "none") -> EngineKey:
    s = r.spec
    return EngineKey(bundle.family.name, fingerprint, s.network, s.variant, s.dilation, s.precision, r.profiles,
                     backend, version, device, ort_optimize)


def build_controlnet_engines(bundle: ModelBundle, controlnets: Sequence[torch.nn.Module], req: BuildRequest,
                             networks: Sequence[str] = (),
                             log: Callable[[str], None] = lambda msg: None) -> BuildReport:
    """Builds the ControlNet and controlled-UNet engines of `req.plan` into `req.output` (entries present and valid
    are skipped); `networks` (CONTROL_SELECTORS) builds only those, so several processes may share the work. Runs
    before `build_engines` where that one releases the bundle's weights."""
    backend, cache, version, device = start_build(req, "--controlnet")
    fam = bundle.family
    hashes = FileHashes(cache.root / HASHES)  # the ControlNets' files, hashed here, are not read again by runs
    jobs = [(m, fp, one) for m, fp, r in _jobs(bundle, req.plan, controlnets, req.precision, req.dilation, hashes)
            if selected(r.spec, networks) for one in backend.requirements(fam, r, req.plan, False)]
    report = BuildReport()
    for n, (module, fp, r) in enumerate(jobs, 1):
        key = control_key(bundle, r, backend.name, version, device, fp, req.ort_optimize)
        sizes = ", ".join(profile_sizes(r.spec.network, r.profiles, fam.vae_scale))
        build_entry(cache, key, f"[controlnet {n}/{len(jobs)}] {r.spec.name} ({sizes}, weights {fp[:12]})", req,
                    f"{backend.name} {version} on {device}", report, log,
                    lambda tmp, module=module, r=r: _export(module, bundle, r, backend, req.device, tmp,
                                                            req.ort_optimize))
    _record_names(cache, fam.name, controlnets, hashes)
    hashes.save()
    return report


def build_entry(cache: EngineCache, key: EngineKey, tag: str, req: BuildRequest, where: str, report: BuildReport,
                log: Callable[[str], None], export: Callable[[Path], object]) -> None:
    """One entry: skipped when a valid one is present (unless `req.force`), else `export(staging folder)` and
    committed whole (a failed export leaves nothing); logged under `tag`, recorded in `report`."""
    entry = None if req.force else cache.lookup(key)
    if entry is not None:
        report.skipped.append(entry)
        log(f"{tag}: up to date, skipped")
        return
    log(f"{tag}: building for {where} ...")
    t0 = time.perf_counter()
    with cache.staging(key) as tmp:
        res = export(tmp)
        entry = cache.commit(key, tmp)
    report.built.append((entry, time.perf_counter() - t0))
    report.exports[entry.digest] = res
    log(f"{tag}: done in {time.perf_counter() - t0:.1f} s, {res.bytes / 2**20:.1f} MiB")


def _record_names(cache: EngineCache, model: str, controlnets: Sequence[torch.nn.Module],
                  hashes: FileHashes) -> None:
    """models.json's names of the ControlNets (their folders' last component, from the config diffusers loaded
    them with), for the C API (engine/model_facts.py record_controlnets); those loaded from no folder are left out."""
    from .model_facts import record_controlnets

    named = {}
    for cn in controlnets:
        src = str(getattr(cn, "config", {}).get("_name_or_path", "") or "")
        if src:
            named[Path(src).name or src] = (loaded_fingerprint(cn, hashes), str(Path(src).resolve()))
    if named:
        record_controlnets(cache, model, named)


def _export(module, bundle: ModelBundle, r: Requirement, backend: Backend, device: str, staging: Path,
            ort_optimize: str = "none"):
    from ..core.specs import UNET
    from ..export.controlnet_export import export_control_aoti, export_control_onnx
    from .aoti_backend import prepare_for_export

    def onnx(path: Path):
        if ort_optimize == "none":
            return export_control_onnx(module, bundle.family, r.spec, path, device=device)
        return _export_fused(module, bundle, r.spec, device, path.parent, ort_optimize)

    # As the UNet's packages are made (fused QKV, attention kernel, channels_last): the ControlNet's encoder and mid
    # block are the UNet's, so they take the same preparation.
    return backend.export(NetworkExport(
        aoti=lambda path, ctx: export_control_aoti(module, bundle.family, r.spec, r.profiles[0], path, device=device,
                                                   kernel_context=ctx,
                                                   prepare=lambda m: prepare_for_export(m, UNET)),
        onnx=onnx), staging, device)


def _export_fused(module, bundle: ModelBundle, spec: ControlSpec, device: str, staging: Path, target: str):
    """As engine/onnx_build.export_model fuses the UNet: exported at fp32 beside the entry, fused (then made fp16
    if the spec is) into the entry's model.onnx; the plain export is gone before the commit."""
    import tempfile

    from ..core.controlnet_specs import controlled_unet_spec, controlnet_spec
    from ..export.controlnet_export import export_control_onnx
    from ..export.onnx_export import ExportResult
    from ..export.ort_optimize import SOURCE_PRECISION, optimize_onnx

    fam = bundle.family
    source = (controlnet_spec(fam, module.config, SOURCE_PRECISION, spec.dilation) if spec.network == CONTROLNET
              else controlled_unet_spec(fam, SOURCE_PRECISION, spec.dilation))
    with tempfile.TemporaryDirectory(dir=staging, prefix=".plain-") as plain:
        res = export_control_onnx(module, fam, source, Path(plain) / "model.onnx", device=device)
        opt = optimize_onnx(res.files[0], staging / "model.onnx", spec, target)
    return ExportResult(opt.files, res.seconds + opt.seconds, sum(f.stat().st_size for f in opt.files))


def controlnet_build_command(bundle: ModelBundle, plan: StagePlan, backend: str, precision: str, dilation: int,
                             engine_dir: Path, device: str, paths: Sequence[str]) -> str:
    """`build_command` with the ControlNets: what builds every engine a controlled run needs."""
    cmd = build_command(bundle, plan, backend, precision, dilation, engine_dir, device)
    return cmd + "".join(f" --controlnet {shlex.quote(str(p))}" for p in paths)


def check_profiles(engine_dir: Path, r: Requirement, same: Sequence[Entry], plan: StagePlan, what: str, cmd: str,
                   missing: Callable[[int], None] | None = None) -> None:
    """`open_profiles`' coverage refusal alone, opening nothing (mf-serve checks a folder before Ray starts): a
    profile of `r` that no entry of `same` covers is refused naming its stage size and `cmd`, after `missing`."""
    for p in r.profiles:
        if not any(_covers(e, p) for e in same):
            if missing is not None:
                missing(p.stage)
            st = plan.stages[p.stage]
            raise CoverageError(f"the engines in {engine_dir} have no {what} at {st.width}x{st.height}; "
                                f"build them with: {cmd}")


def open_profiles(engine_dir: Path, r: Requirement, same: Sequence[Entry], plan: StagePlan, what: str, cmd: str,
                  backend: str, device: torch.device, family: ModelFamily, verify: Callable[[Entry], object],
                  missing: Callable[[int], None] | None = None) -> Runner:
    """One runner over `r`'s profiles from the candidate entries `same` (the right network, variant, precision and
    weights): per profile the tightest entry covering it, of this backend version and device, verified once
    (`verify`). A profile no entry covers is refused naming its stage size and `cmd` (after `missing(stage)`,
    which may raise a more precise refusal); a stale one naming what it was built for."""
    check_profiles(engine_dir, r, same, plan, what, cmd, missing)
    installed, here = get_backend(backend).version(), device_name(device)
    picked: list[Entry] = []
    for p in r.profiles:
        fits = sorted((e for e in same if _covers(e, p)), key=lambda e: (_span(e, p), -e.created))
        valid = [e for e in fits if e.key.backend_version == installed and e.key.device == here]
        if not valid:
            e = fits[0]
            why = (f"{backend} {e.key.backend_version} (installed: {installed})"
                   if e.key.backend_version != installed else f"device {e.key.device!r} (this one: {here!r})")
            raise StaleEngineError(f"engine {what} in {engine_dir} was built for {why}; rebuild with: {cmd}")
        if valid[0] not in picked:
            verify(valid[0])
            picked.append(valid[0])
    opener, ctx = get_backend(backend), OpenContext(family, device)
    runners = [opener.open(e, engine_dir / e.files[0].path, r.spec, ctx) for e in picked]
    return runners[0] if len(runners) == 1 else ShapeDispatch(tuple((e.key.profiles, x)
                                                                    for e, x in zip(picked, runners)))


def _folder(engine_dir: Path, bundle: ModelBundle, plan: StagePlan, backend: str, precision: str, dilation: int,
            device: torch.device, paths: Sequence[str]) -> tuple[EngineCache, list[Entry], str]:
    """(the folder's cache, its entries of this model and backend, the command that builds a controlled run's
    engines); a backend that takes no ControlNet is refused by name."""
    if backend not in CONTROL_BACKENDS:
        raise CoverageError(f"--controlnet runs on {' or '.join(CONTROL_BACKENDS)} engines; the engines in "
                            f"{engine_dir} are {backend}")
    cache = EngineCache(engine_dir)
    entries = [e for e in cache.entries().values() if e.key.model == bundle.family.name and e.key.backend == backend]
    cmd = controlnet_build_command(bundle, plan, backend, precision, dilation, engine_dir, device.type, paths)
    return cache, entries, cmd


def _what(spec, path: str) -> str:
    """The network as a refusal names it (a ControlNet's with its folder)."""
    what = f"{spec.network} ({spec.variant}, {spec.precision})"
    return what + (f" of --controlnet {path}" if spec.network == CONTROLNET else "")


def check_controlnet_engines(engine_dir: str | Path, bundle: ModelBundle, plan: StagePlan, configs: Sequence,
                             paths: Sequence[str], weights: Sequence[str], backend: str, precision: str,
                             dilation: int = 2, device: torch.device | str = "cpu") -> None:
    """`open_controlnet_runners`' coverage refusal before any module is loaded (mf-serve checks a folder before Ray
    starts): every controlnet and unet_controlled profile of `plan`, for the ControlNets in `paths` (their diffusers
    `configs`), covered by an entry of this backend, precision and dilation; a ControlNet's entries hold its
    folder's fingerprint (`weights`, in order: `fingerprint.folder_fingerprints`). The controlled UNet's weights
    are checked when it is opened."""
    engine_dir = Path(engine_dir)
    _, entries, cmd = _folder(engine_dir, bundle, plan, backend, precision, dilation, torch.device(device), paths)
    for path, config, fp in zip(paths, configs, weights):
        for r in controlnet_requirements(bundle.family, plan, config, precision, dilation):
            s = r.spec
            same = [e for e in entries
                    if (e.key.network, e.key.dilation, e.key.precision) == (s.network, s.dilation, s.precision)
                    and (s.network != CONTROLNET or e.key.weights == fp)]
            check_profiles(engine_dir, r, same, plan, _what(s, path), cmd)


def open_controlnet_runners(engine_dir: str | Path, bundle: ModelBundle, plan: StagePlan,
                            controlnets: Sequence[torch.nn.Module], paths: Sequence[str], backend: str,
                            precision: str, dilation: int = 2, device: torch.device | str = "cpu",
                            unet_fingerprint: str | None = None) -> tuple[dict[int, list[Runner]], dict[int, Runner]]:
    """({dilation: one runner per ControlNet, in order}, {dilation: controlled-UNet runner}) from `engine_dir`, for
    the backend and precision the plan's other engines were opened with. A network or stage shape without a valid
    entry is refused with the command that builds it (`paths`: the ControlNets' folders, for that command).
    `unet_fingerprint`: the UNet's, as `open_engines` hashed it (saves hashing it again)."""
    engine_dir, device = Path(engine_dir), torch.device(device)
    cache, entries, cmd = _folder(engine_dir, bundle, plan, backend, precision, dilation, device, paths)
    nets: dict[int, list[Runner]] = {}
    unets: dict[int, Runner] = {}
    where = {id(cn): i for i, cn in enumerate(controlnets)}
    hashes = FileHashes(engine_dir / HASHES)
    jobs = _jobs(bundle, plan, controlnets, precision, dilation, hashes, unet_fingerprint)
    hashes.save()
    for module, fp, r in jobs:
        s = r.spec
        same = [e for e in entries if (e.key.network, e.key.dilation, e.key.precision, e.key.weights)
                == (s.network, s.dilation, s.precision, fp)]
        what = _what(s, paths[where[id(module)]] if s.network == CONTROLNET else "")
        runner = open_profiles(engine_dir, r, same, plan, what, cmd, backend, device, bundle.family, cache.verify)
        if s.network == CONTROLNET:
            nets.setdefault(s.dilation, []).append(runner)
        else:
            unets[s.dilation] = runner
    return nets, unets
