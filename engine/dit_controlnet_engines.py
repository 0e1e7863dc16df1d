"""ControlNet engines of SD3 and FLUX (issue #18 item 1 for the transformer families): the ControlNets and the
controlled transformer (export/dit_controlnet_aoti.py) as static AOTInductor packages per stage shape, in the
engine folder beside the plain transformer's (engine/dit_engines.py).

Keys as the UNet families' ControlNet engines have them (engine/controlnet_engines.py): a ControlNet's holds its
own weights fingerprint, so several ControlNets (or one under other weights) each get their entries; the
controlled transformer's holds the plain transformer packages' fingerprint, and its profiles name the block
samples it takes, so ControlNets of another layout get packages of their own.
"""
from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.controlnet_specs import CONTROLNET
from ..core.dit_families import DiTFamily
from ..core.dit_loading import DiTBundle
from ..core.plan import StagePlan
from ..core.specs import NetworkSpec, ShapeProfile
from .aoti_backend import StaticPackage
from .backend import get_backend
from .cache import EngineCache, EngineError, EngineKey, device_name, weights_fingerprint
from .dit_engines import check_entry
from .file_hashes import HASHES, FileHashes
from .fingerprint import folder_fingerprint, folder_fingerprints, loaded_fingerprint
from .load import _build_command
from .runners import ShapeDispatch

Log = Callable[[str], None]


@dataclass(frozen=True)
class ControlRequirement:
    """One package to build or open: the module it is made from, its weights fingerprint, spec and stage shape."""

    module: torch.nn.Module
    weights: str
    spec: NetworkSpec
    profile: ShapeProfile
    batch: int
    latent_h: int
    latent_w: int
    index: int
    """Which ControlNet (in order); -1 for the controlled transformer."""


def _profile(spec: NetworkSpec, axes: dict[str, int]) -> ShapeProfile:
    return ShapeProfile(0, tuple((t.name, t.concrete(axes), t.concrete(axes), t.concrete(axes)) for t in spec.inputs))


def _shapes(family: DiTFamily, plan: StagePlan) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in plan.stages:
        hw = (s.height // family.vae_scale, s.width // family.vae_scale)
        if hw not in out:
            out.append(hw)
    return out


def dit_control_requirements(bundle: DiTBundle, plan: StagePlan, controlnets: Sequence[torch.nn.Module],
                             precision: str, batch: int, hashes: FileHashes | None = None,
                             transformer_weights: str | None = None) -> tuple[ControlRequirement, ...]:
    """Per distinct stage shape of `plan` at transformer batch `batch`: each ControlNet's package, then the
    controlled transformer's (`transformer_weights`: its fingerprint where the caller has it; `hashes`: the
    engine folder's remembered file hashes, for the ControlNets' folders)."""
    from ..export.dit_controlnet_aoti import control_axes, control_layout, controlled_dit_spec, controlnet_dit_spec

    fam = bundle.family
    guidance = bool(getattr(bundle.transformer.config, "guidance_embeds", False))
    controlled = controlled_dit_spec(fam, control_layout(controlnets), precision, guidance)
    specs = [(cn, loaded_fingerprint(cn, hashes), controlnet_dit_spec(fam, cn, precision), j)
             for j, cn in enumerate(controlnets)]
    specs.append((bundle.transformer, transformer_weights or weights_fingerprint(bundle.transformer), controlled, -1))
    out = []
    for h, w in _shapes(fam, plan):
        axes = control_axes(fam, batch, h, w)
        out += [ControlRequirement(m, fp, spec, _profile(spec, axes), batch, h, w, j) for m, fp, spec, j in specs]
    return tuple(out)


def _key(family: DiTFamily, r: ControlRequirement, device: str) -> EngineKey:
    s = r.spec
    return EngineKey(family.name, r.weights, s.network, s.variant, s.dilation, s.precision, (r.profile,), "aoti",
                     get_backend("aoti").version(), device_name(device))


def build_dit_controlnet_engines(bundle: DiTBundle, plan: StagePlan, controlnets: Sequence[torch.nn.Module],
                                 precision: str, output, batch: int, device: str = "cpu", force: bool = False,
                                 log: Log = lambda m: None) -> int:
    """Builds every ControlNet and controlled-transformer package `plan` needs into `output` (present, valid entries
    are kept); returns how many were built. The ControlNets as loaded for the run (their dtype and device)."""
    from ..export.dit_controlnet_aoti import control_layout, export_dit_control_aoti
    from .aoti_backend import cudnn_first

    get_backend("aoti").check_available(device)
    cache = EngineCache(output)
    cache.entries()  # a corrupt manifest stops the build before any work
    hashes = FileHashes(cache.root / HASHES)  # the ControlNets' files, hashed here, are not read again by runs
    reqs = dit_control_requirements(bundle, plan, controlnets, precision, batch, hashes)
    layout = control_layout(controlnets)
    ctx = cudnn_first if torch.device(device).type == "cuda" else contextlib.nullcontext
    built = 0
    for n, r in enumerate(reqs, 1):
        key = _key(bundle.family, r, device)
        tag = (f"[controlnet {n}/{len(reqs)}] {r.spec.network}-{r.spec.variant}-{r.spec.precision} "
               f"(batch {r.batch}, latent {r.latent_w}x{r.latent_h}, weights {r.weights[:20]})")
        if not force and cache.lookup(key) is not None:
            log(f"{tag}: up to date, skipped")
            continue
        log(f"{tag}: building for aoti {key.backend_version} on {key.device} ...")
        with cache.staging(key) as tmp:
            res = export_dit_control_aoti(r.module, bundle.family, r.spec, tmp / "model.pt2", r.batch, r.latent_h,
                                          r.latent_w, layout, device=device, kernel_context=ctx)
            entry = cache.commit(key, tmp)
        built += 1
        log(f"{tag}: done in {res.seconds:.1f} s, {sum(f.size for f in entry.files) / 2**20:.1f} MiB")
    record_flow_controlnets(cache, bundle.family, controlnets, hashes)
    hashes.save()
    return built


def record_flow_controlnets(cache: EngineCache, family: DiTFamily, controlnets: Sequence[torch.nn.Module],
                            hashes: FileHashes | None = None) -> None:
    """models.json's names of the ControlNets (their folders' last component) with what libmegafusion needs beyond
    the packages (cpp/src/lib/flow_control.cpp): the names of their outputs, in order (`control_layout`'s, which the
    controlled transformer's inputs carry), whether the net takes zero pooled projections and the unshifted latent
    (InstantX's SD3 kind, runtime/flow_controlnet.py) and whether it has a pixel hint block (XLabs' FLUX kind)."""
    from ..export.dit_controlnet_aoti import control_layout, has_hint_block
    from .model_facts import record_controlnets

    named, facts = {}, {}
    for cn in controlnets:
        src = str(getattr(cn, "config", {}).get("_name_or_path", "") or "")
        if not src:  # loaded from no folder: no name to record
            continue
        name = Path(src).name or src
        named[name] = (loaded_fingerprint(cn, hashes), str(Path(src).resolve()))
        zero = family.kind == "sd3" and bool(getattr(cn.config, "force_zeros_for_pooled_projection", False))
        facts[name] = {"outputs": list(control_layout([cn]).names()), "zero_pooled": zero,
                       "hint_block": has_hint_block(cn)}
    if named:
        record_controlnets(cache, family.name, named, facts)


def dit_controlnet_build_command(family: DiTFamily, source: str, plan: StagePlan, precision: str, folder,
                                 device, batch: int, paths: Sequence[str]) -> str:
    """The mf-build-engines command that builds every package a controlled run of `plan` needs."""
    cmd = _build_command(family, source, plan, "aoti", precision, 2, Path(folder), torch.device(device).type)
    if batch == 1 and family.cfg:
        cmd += " --guidance 1"
    return cmd + "".join(f" --controlnet {shlex.quote(str(p))}" for p in paths)


def check_dit_controlnet_engines(folder, family: DiTFamily, plan: StagePlan, device, precision: str, batch: int,
                                 command: str, controlnets: Sequence[tuple[str, str | None]] = ()) -> None:
    """Before any model load: EngineError naming `command` unless `folder` holds a controlled-transformer package
    for every stage shape of `plan` at transformer batch `batch`, and a package of each ControlNet in `controlnets`
    ((folder, `dit_folder_weights`' fingerprint)) built from its weights (one without a fingerprint, which shares
    the transformer's patch embedding, is checked when opened)."""
    from ..export.dit_aoti import dit_spec
    from ..export.dit_controlnet_aoti import CONTROLLED_TRANSFORMER, control_axes

    device = torch.device(device)
    sample = dit_spec(family, precision).inputs[0]
    entries = [e for e in EngineCache(folder).entries().values()
               if e.key.model == family.name and e.key.backend == "aoti" and e.key.device == device_name(device)
               and e.key.precision == precision]
    wanted = [(CONTROLLED_TRANSFORMER, None, "controlled-transformer package")]
    wanted += [(CONTROLNET, fp, f"ControlNet package of --controlnet {p}") for p, fp in controlnets if fp is not None]
    for network, weights, what in wanted:
        held = {p.shapes[0][1] for e in entries if e.key.network == network
                and weights in (None, e.key.weights) for p in e.key.profiles}
        for s in plan.stages:
            shape = sample.concrete(control_axes(family, batch, s.height // family.vae_scale,
                                                 s.width // family.vae_scale))
            if shape not in held:
                raise EngineError(f"{folder} holds no {family.name} {what} for the {s.width}x{s.height} stage at "
                                  f"batch {batch} in {precision}; build it with: {command}")


def dit_folder_weights(engine_dir, family: DiTFamily, paths: Sequence[str]) -> list[tuple[str, str | None]]:
    """(folder, `folder_weights`) of each ControlNet folder, its files hashed once with `engine_dir`'s remembered
    hashes: what `check_dit_controlnet_engines` takes."""
    return list(zip(paths, folder_fingerprints(engine_dir, paths, lambda p, h: folder_weights(family, p, h))))


def folder_weights(family: DiTFamily, path, hashes: FileHashes | None = None) -> str | None:
    """The fingerprint the ControlNet in folder `path` has once loaded (runtime/flow_controlnet.py marks where it
    was read from), without loading it; None for an SD3.5 ControlNet that shares the transformer's patch embedding
    (only its tensors say what it computes)."""
    if family.kind == "sd3":
        try:
            config = json.loads(Path(path, "config.json").read_text())
        except (OSError, ValueError):
            return None  # the loader refuses it in one line
        if not (config.get("use_pos_embed", True) if isinstance(config, dict) else True):
            return None
    return folder_fingerprint(path, hashes)


def open_dit_controlnet_engines(folder, bundle: DiTBundle, plan: StagePlan, controlnets: Sequence[torch.nn.Module],
                                paths: Sequence[str], device, precision: str, batch: int, hint_flags: str = "",
                                ) -> tuple[list[ShapeDispatch], ShapeDispatch]:
    """(one dispatch per ControlNet, in order; the controlled transformer's) over the packages in `folder` for
    every stage shape of `plan`, verified. EngineError naming what is missing or stale and the command that
    builds it (plus `hint_flags`: a LoRA's, whose fused weights key the controlled transformer)."""
    device = torch.device(device)
    fam = bundle.family
    cache = EngineCache(folder)
    command = dit_controlnet_build_command(fam, bundle.source, plan, precision, folder, device, batch,
                                           paths) + hint_flags
    version = get_backend("aoti").version()
    entries = [e for e in cache.entries().values() if e.key.model == fam.name and e.key.backend == "aoti"
               and e.key.device == device_name(device) and e.key.precision == precision]
    engines: dict[int, list] = {}
    hashes = FileHashes(cache.root / HASHES)
    reqs = dit_control_requirements(bundle, plan, controlnets, precision, batch, hashes)
    hashes.save()
    for r in reqs:
        what = (f"ControlNet package of --controlnet {paths[r.index]}" if r.spec.network == CONTROLNET
                else f"controlled-transformer package ({r.spec.variant})")
        where = f"at latent {r.latent_w}x{r.latent_h}, batch {r.batch}"
        same = [e for e in entries if (e.key.network, e.key.variant) == (r.spec.network, r.spec.variant)
                and e.key.profiles == (r.profile,)]
        if not same:
            raise EngineError(f"{folder} holds no {fam.name} {what} {where} in {precision}; build it with: {command}")
        mine = [e for e in same if e.key.weights == r.weights] or same
        e = sorted(mine, key=lambda e: -e.created)[0]
        check_entry(e, folder, r.weights, "aoti", version, command)
        cache.verify(e)
        engines.setdefault(r.index, []).append(((r.profile,), StaticPackage(cache.root / e.files[0].path, r.spec,
                                                                            device)))
    dispatch = {j: ShapeDispatch(tuple(v)) for j, v in engines.items()}
    return [dispatch[j] for j in range(len(controlnets))], dispatch[-1]
