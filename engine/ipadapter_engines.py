"""IP-Adapter UNet engines (issue #18 items 2 and 5): build the `unet_ip` networks of a plan (core/ipadapter_specs.py)
into an engine folder, and open them for a run.

Entries sit in the same content-addressed cache as the plan's other engines. Their key's weights field holds the
UNet's fingerprint, the IP-Adapter file's sha256 and the scale baked in (`ip_adapter_fingerprint`), so another file
or scale is another entry. The image encoder's embeddings are computed once per generation: by its own engine when
`mf-build-engines ... --ip-adapter-encoder DIR` built one (engine/image_encoder_engines.py; the C API needs it to
take an image), else by the torch encoder. The aoti backend builds one static package per stage shape (as for the
UNet), onnxruntime one model over the plan's stage profiles, as the ControlNet engines (engine/controlnet_engines.py,
whose helpers this module reuses).
"""
from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.ipadapter_specs import UNET_IP, ip_requirements
from ..core.loading import ModelBundle
from ..core.plan import StagePlan
from ..core.specs import Requirement, profile_sizes
from .backend import Backend, NetworkExport
from .build import BuildReport, BuildRequest
from .cache import EngineCache
from .controlnet_engines import (CONTROL_BACKENDS, build_entry, check_profiles, control_key, open_profiles,
                                 selected, start_build)
from .file_hashes import HASHES, FileHashes
from .fingerprint import ip_adapter_fingerprint, ip_adapter_parts, network_fingerprint
from .load import CoverageError, _covers, build_command
from .runners import Runner

IP_BACKENDS = CONTROL_BACKENDS
"""Backends that build IP-Adapter engines."""

IP_SELECTORS = frozenset({UNET_IP, f"{UNET_IP}-standard", f"{UNET_IP}-dilated"})
"""What `mf-build-engines --networks` takes for these networks."""


def embed_dim(state: dict) -> int:
    """D of `image_embeds`: the columns of the IP-Adapter's image projection (runtime/ipadapter.read_ip_adapter
    has checked that it is there)."""
    return int(state["image_proj"]["proj.weight"].shape[1])


def build_ip_engines(bundle: ModelBundle, state: dict, path: str | Path, scale: float, req: BuildRequest,
                     networks=(), log: Callable[[str], None] = lambda msg: None) -> BuildReport:
    """Builds the unet_ip engines of `req.plan` for the IP-Adapter `state` read from the file `path`, at `scale`,
    into `req.output` (entries present and valid are skipped); `networks` (IP_SELECTORS; empty: all). Runs before
    `build_engines` where that one releases the bundle's weights; the bundle's UNet is left as it was."""
    from ..export.ipadapter_export import ip_unet

    backend, cache, version, device = start_build(req, "--ip-adapter")
    fam = bundle.family
    fp = ip_adapter_fingerprint(network_fingerprint(bundle, "unet"), path, scale)
    # Fused (export/ort_optimize.py), an IP attention became a MultiHeadAttention node that the CPU EP refused at
    # run time (key and value shapes): these entries are exported unfused, and their key says so.
    if req.ort_optimize != "none":  # only a backend with ORT fusions takes another level (check_request)
        log(f"ip-adapter: unet_ip is exported unfused (--ort-optimize {req.ort_optimize} does not fuse its IP "
            "attention yet)")
    jobs = [one for r in ip_requirements(fam, req.plan, embed_dim(state), req.precision, req.dilation)
            if selected(r.spec, networks) for one in backend.requirements(fam, r, req.plan, False)]
    report, modules = BuildReport(), []

    def export(tmp: Path, r: Requirement):
        if not modules:  # made once, and only when an entry is missing
            modules.append(ip_unet(bundle.unet, state, scale))
        return _export(modules[0], bundle, r, backend, req.device, tmp)

    for n, r in enumerate(jobs, 1):
        key = control_key(bundle, r, backend.name, version, device, fp)
        sizes = ", ".join(profile_sizes(UNET_IP, r.profiles, fam.vae_scale))
        build_entry(cache, key, f"[ip-adapter {n}/{len(jobs)}] {r.spec.name} ({sizes}, scale {scale:g})", req,
                    f"{backend.name} {version} on {device}", report, log, lambda tmp, r=r: export(tmp, r))
    return report


def _export(module, bundle: ModelBundle, r: Requirement, backend: Backend, device: str, staging: Path):
    from ..export.ipadapter_export import export_ip_aoti, export_ip_onnx

    return backend.export(NetworkExport(
        aoti=lambda path, ctx: export_ip_aoti(module, bundle.family, r.spec, r.profiles[0], path, device=device,
                                              kernel_context=ctx),
        onnx=lambda path: export_ip_onnx(module, bundle.family, r.spec, path, device=device)), staging, device)


def ip_build_command(bundle: ModelBundle, plan: StagePlan, backend: str, precision: str, dilation: int,
                     engine_dir: Path, device: str, path: str | Path, scale: float) -> str:
    """`build_command` with the IP-Adapter: what builds every engine an IP-Adapter run needs."""
    cmd = build_command(bundle, plan, backend, precision, dilation, engine_dir, device)
    return cmd + f" --ip-adapter {shlex.quote(str(path))} --ip-adapter-scale {float(scale)!r}"


def _ip_needs(engine_dir: Path, bundle: ModelBundle, plan: StagePlan, dim: int, path: str | Path, scale: float,
              backend: str, precision: str, dilation: int, device: torch.device, unet_fingerprint: str | None,
              hashes: FileHashes):
    """Per unet_ip requirement of the plan: (requirement, entries of this file and scale, what to call it, the build
    command, the refusal of a stage this file was built for at another scale only)."""
    if backend not in IP_BACKENDS:
        raise CoverageError(f"--ip-adapter runs on {' or '.join(IP_BACKENDS)} engines; the engines in "
                            f"{engine_dir} are {backend}")
    cache = EngineCache(engine_dir)
    base = unet_fingerprint or network_fingerprint(bundle, "unet", hashes)
    fp = ip_adapter_fingerprint(base, path, scale, hashes)
    _, file_sha, _ = ip_adapter_parts(fp)
    entries = [e for e in cache.entries().values() if e.key.model == bundle.family.name and e.key.backend == backend
               and e.key.network == UNET_IP]
    cmd = ip_build_command(bundle, plan, backend, precision, dilation, engine_dir, device.type, path, scale)
    for r in ip_requirements(bundle.family, plan, dim, precision, dilation):
        s = r.spec
        ours = [e for e in entries if (e.key.dilation, e.key.precision) == (s.dilation, s.precision)]
        same = [e for e in ours if e.key.weights == fp]
        what = f"{UNET_IP} ({s.variant}, {s.precision}) of --ip-adapter {path}"

        def other_scale(stage: int, r=r, ours=ours, what=what) -> None:  # this file built at another scale only
            p = next(q for q in r.profiles if q.stage == stage)
            other = sorted({parts[2] for e in ours if _covers(e, p) and (parts := ip_adapter_parts(e.key.weights))
                            and parts[:2] == (base, file_sha)})
            if other:
                built = ", ".join(f"{x!r}" for x in other)
                raise CoverageError(f"the engines in {engine_dir} hold {what} built with --ip-adapter-scale "
                                    f"{built}, not {float(scale)!r}: run with --ip-adapter-scale {other[0]!r}, or "
                                    f"build this scale with: {cmd}")

        yield r, same, what, cmd, other_scale, cache


def open_ip_runners(engine_dir: str | Path, bundle: ModelBundle, plan: StagePlan, dim: int, path: str | Path,
                    scale: float, backend: str, precision: str, dilation: int = 2,
                    device: torch.device | str = "cpu", unet_fingerprint: str | None = None) -> dict[int, Runner]:
    """{dilation: unet_ip runner} from `engine_dir` for the IP-Adapter file `path` at `scale` (image embeddings of
    `dim` features), for the backend and precision the plan's other engines were opened with. A stage shape
    without a valid entry is refused with the command that builds it; entries of this file at another scale only
    are refused naming the scale they were built with. `unet_fingerprint`: the UNet's, as `open_engines` hashed it."""
    engine_dir, device = Path(engine_dir), torch.device(device)
    hashes = FileHashes(engine_dir / HASHES)
    out: dict[int, Runner] = {}
    for r, same, what, cmd, other_scale, cache in _ip_needs(engine_dir, bundle, plan, dim, path, scale, backend,
                                                            precision, dilation, device, unet_fingerprint, hashes):
        out[r.spec.dilation] = open_profiles(engine_dir, r, same, plan, what, cmd, backend, device,
                                             bundle.family, lambda e: cache.verify(e, hashes), other_scale)
    hashes.save()
    return out


def check_ip_engines(engine_dir: str | Path, bundle: ModelBundle, plan: StagePlan, dim: int, path: str | Path,
                     scale: float, backend: str, precision: str, dilation: int = 2,
                     device: torch.device | str = "cpu") -> None:
    """`open_ip_runners`' refusals of a missing stage, another file or another scale, opening and verifying nothing
    (mf-serve's start, before Ray: the bundle may hold no weights, its fingerprint comes from their origin). The
    backend version and device are left to the replicas, which open the entries."""
    engine_dir, device = Path(engine_dir), torch.device(device)
    hashes = FileHashes(engine_dir / HASHES)
    for r, same, what, cmd, other_scale, _ in _ip_needs(engine_dir, bundle, plan, dim, path, scale, backend,
                                                        precision, dilation, device, None, hashes):
        check_profiles(engine_dir, r, same, plan, what, cmd, other_scale)
    hashes.save()
