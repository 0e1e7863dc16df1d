"""The text-encoder and VAE packages of SD3 / FLUX in the engine folder (export/flow_aux_aoti.py), built beside the
transformer packages (engine/dit_engines.py) by `mf-build-engines --model sd3|flux --backend aoti`, keyed as the
UNet families' text encoder and VAE entries are (network, weights fingerprint of the module, static profile), so
libmegafusion finds them by network name. `FlowAuxPackages` runs them from Python (what the tests compare).

Shapes, as core/specs.plan_requirements for the UNet families: text encoders once; the VAE decoder at every stage
with the pixel relay (truncation decode, final decode), else the last; the encoder at every stage after the first
(pixel relay only).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.dit_loading import DiTBundle
from ..core.plan import StagePlan
from ..core.specs import VAE_DECODER, VAE_ENCODER, NetworkSpec, ShapeProfile
from .aoti_backend import StaticPackage
from .backend import get_backend
from .cache import EngineCache, EngineError, EngineKey, device_name, weights_fingerprint

Log = Callable[[str], None]


@dataclass(frozen=True)
class FlowAuxRequirement:
    """One package: the spec and its one static profile."""

    spec: NetworkSpec
    profile: ShapeProfile


def flow_aux_requirements(family, plan: StagePlan, precision: str, relay: str = "pixel") -> tuple[FlowAuxRequirement, ...]:
    """Every text encoder and VAE package a run of `plan` calls (one per distinct VAE shape)."""
    from ..export.flow_aux_aoti import flow_text_encoder_specs, flow_vae_specs

    def static(spec: NetworkSpec, stage: int, h: int, w: int) -> ShapeProfile:
        axes = spec.axes(1, h, w, family.vae_scale)
        return ShapeProfile(stage, tuple((t.name, *(t.concrete(axes),) * 3) for t in spec.inputs))

    out = [FlowAuxRequirement(s, static(s, 0, 1, 1)) for s in flow_text_encoder_specs(family, precision)]
    enc, dec = flow_vae_specs(family, precision)
    vs, last = family.vae_scale, len(plan.stages) - 1
    pixel = relay == "pixel"
    for spec, stages in ((dec, range(last + 1) if pixel else [last]), (enc, range(1, last + 1) if pixel else [])):
        seen = set()
        for k in stages:
            s = plan.stages[k]
            p = static(spec, k, s.height // vs, s.width // vs)
            if p.shapes not in seen:
                seen.add(p.shapes)
                out.append(FlowAuxRequirement(spec, p))
    return tuple(out)


def _module(bundle: DiTBundle, network: str) -> torch.nn.Module:
    from ..core.specs import text_encoder_name

    if network in (VAE_DECODER, VAE_ENCODER):
        return bundle.vae
    return bundle.text_encoders[[text_encoder_name(i) for i in range(len(bundle.text_encoders))].index(network)]


def _key(bundle: DiTBundle, r: FlowAuxRequirement, weights: str, device: str) -> EngineKey:
    s = r.spec
    return EngineKey(bundle.family.name, weights, s.network, s.variant, s.dilation, s.precision, (r.profile,),
                     "aoti", get_backend("aoti").version(), device_name(device))


def build_flow_aux_engines(bundle: DiTBundle, plan: StagePlan, precision: str, output, device: str = "cpu",
                           force: bool = False, relay: str = "pixel", log: Log = lambda m: None,
                           groups: tuple[str, ...] = ("text_encoders", "vae")) -> int:
    """Builds the text encoder and VAE packages `plan` needs into `output` (present, valid entries are kept);
    returns how many were built. The bundle's modules run in the dtype they were loaded in. `groups`: build the
    text encoders, the VAE or both."""
    from ..export.flow_aux_aoti import export_flow_aux_aoti
    from .aoti_backend import cudnn_first

    get_backend("aoti").check_available(device)
    cache = EngineCache(output)
    cache.entries()  # a corrupt manifest stops the build before any work
    reqs = tuple(r for r in flow_aux_requirements(bundle.family, plan, precision, relay)
                 if ("vae" if r.spec.network in (VAE_DECODER, VAE_ENCODER) else "text_encoders") in groups)
    fingerprints: dict[str, str] = {}
    ctx = cudnn_first if torch.device(device).type == "cuda" else contextlib.nullcontext
    built = 0
    for n, r in enumerate(reqs, 1):
        net = r.spec.network
        if net not in fingerprints:
            fingerprints[net] = weights_fingerprint(_module(bundle, net))
        key = _key(bundle, r, fingerprints[net], device)
        shapes = tuple(lo for _, lo, _, _ in r.profile.shapes)
        tag = f"[{n}/{len(reqs)}] {r.spec.name} {shapes[0]}"
        if not force and cache.lookup(key) is not None:
            log(f"{tag}: up to date, skipped")
            continue
        log(f"{tag}: building for aoti {key.backend_version} on {key.device} ...")
        with cache.staging(key) as tmp:
            res = export_flow_aux_aoti(bundle, r.spec, shapes, tmp / "model.pt2", device=device, kernel_context=ctx)
            entry = cache.commit(key, tmp)
        built += 1
        log(f"{tag}: done in {res.seconds:.1f} s, {sum(f.size for f in entry.files) / 2**20:.1f} MiB")
    record_flow_model(cache, bundle, fingerprints)
    return built


def record_flow_model(cache: EngineCache, bundle: DiTBundle, fingerprints: dict[str, str]) -> None:
    """models.json for libmegafusion: the UNet families' facts (VAE scaling, vocabularies: CLIP ones then T5's,
    the weights of each network, `fingerprints` and the transformer's) plus the VAE's shift factor."""
    from ..core.dit_specs import TRANSFORMER
    from .model_facts import MODELS, FORMAT, read_models, record_model

    record_model(cache, bundle, {**fingerprints, TRANSFORMER: weights_fingerprint(bundle.transformer)})
    with cache.locked():
        models = read_models(cache.root)
        models[bundle.family.name]["vae_shift_factor"] = float(bundle.vae.config.shift_factor or 0.0)
        cache.write_json(MODELS, {"format": FORMAT, "models": models})


class FlowAuxPackages:
    """The folder's text encoder and VAE packages of this bundle's weights, opened and verified, called as
    FlowTorchNetworks calls the modules (float32 in and out). EngineError naming the missing package."""

    def __init__(self, folder, bundle: DiTBundle, device, precision: str):
        from ..export.flow_aux_aoti import flow_text_encoder_specs, flow_vae_specs

        self.device = torch.device(device)
        cache = EngineCache(folder)
        fam = bundle.family
        specs = {s.network: s for s in (*flow_text_encoder_specs(fam, precision), *flow_vae_specs(fam, precision))}
        self.packages: dict[tuple[str, tuple[int, ...]], StaticPackage] = {}
        for net, spec in specs.items():
            weights = weights_fingerprint(_module(bundle, net))
            for e in cache.entries().values():
                k = e.key
                if (k.model, k.network, k.weights, k.precision, k.backend, k.device) != (
                        fam.name, net, weights, precision, "aoti", device_name(self.device)):
                    continue
                cache.verify(e)
                self.packages[(net, k.profiles[0].shapes[0][1])] = StaticPackage(cache.root / e.files[0].path, spec,
                                                                                 self.device)
        self.folder, self.family = folder, fam

    def run(self, network: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pkg = self.packages.get((network, tuple(x.shape)))
        if pkg is None:
            raise EngineError(f"{self.folder} holds no {self.family.name} {network} package for input shape "
                              f"{tuple(x.shape)}; build it with mf-build-engines --model {self.family.name} "
                              "--backend aoti")
        out = pkg.run({pkg.spec.inputs[0].name: x.contiguous()})
        return tuple(out[t.name] for t in pkg.spec.outputs)
