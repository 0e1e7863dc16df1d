"""AOTInductor engines of the SD3 and FLUX transformers in the content-addressed engine folder (engine/cache.py),
built and opened for the flow pipeline (runtime/flow_pipeline.py), as engine/if_engines.py does for IF's UNets.

Keys are the latent families' `EngineKey`s with the network `transformer` and `export/dit_aoti.dit_spec`'s
inputs in the profiles: one static package per precision and stage shape (transformer batch and latent size).
The backend comes from the registry (name, version, availability); `aoti` builds these, `onnxruntime` one dynamic
engine per plan range (engine/dit_onnx_engines.py); `dit_engine_kinds` and `choose_dit_engines` (at the end) are
the table of both and the choice between them (the torch path is the pipeline's own modes).
An opened folder stands in for the transformer module in `FlowTorchNetworks`, so the stage loop, its graphs
mode included, runs unchanged on it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.dit_families import DiTFamily
from ..core.dit_loading import DiTBundle
from ..core.dit_specs import TRANSFORMER
from ..core.plan import StagePlan
from ..core.specs import NetworkSpec, ShapeProfile
from .aoti_backend import StaticPackage
from .backend import get_backend
from .cache import EngineCache, EngineError, EngineKey, device_name, weights_fingerprint
from .flow_networks import FlowTorchNetworks
from .runners import ShapeDispatch

DIT_BACKENDS = ("aoti", "onnxruntime")
"""Backends that build transformer engines (`dit_engine_kinds` says how each does)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class DiTRequirement:
    """One transformer package to build: the spec and the one static shape profile it serves."""

    spec: NetworkSpec
    profile: ShapeProfile
    batch: int
    latent_h: int
    latent_w: int


def _guidance_embeds(bundle: DiTBundle) -> bool:
    return bool(getattr(bundle.transformer.config, "guidance_embeds", False))


def dit_requirements(bundle: DiTBundle, plan: StagePlan, precision: str, batch: int) -> tuple[DiTRequirement, ...]:
    """One package per distinct stage shape of `plan` at transformer batch `batch` (SD3 with CFG: 2)."""
    from ..export.dit_aoti import dit_axes, dit_spec

    fam = bundle.family
    spec = dit_spec(fam, precision, _guidance_embeds(bundle))
    out, seen = [], set()
    for s in plan.stages:
        h, w = s.height // fam.vae_scale, s.width // fam.vae_scale
        if (h, w) in seen:
            continue
        seen.add((h, w))
        axes = dit_axes(fam, batch, h, w)
        profile = ShapeProfile(0, tuple((t.name, t.concrete(axes), t.concrete(axes), t.concrete(axes))
                                        for t in spec.inputs))
        out.append(DiTRequirement(spec, profile, batch, h, w))
    return tuple(out)


def _key(bundle: DiTBundle, r: DiTRequirement, weights: str, device: str) -> EngineKey:
    s, b = r.spec, get_backend("aoti")
    return EngineKey(bundle.family.name, weights, s.network, s.variant, s.dilation, s.precision, (r.profile,),
                     "aoti", b.version(), device_name(device))


def build_dit_engines(bundle: DiTBundle, plan: StagePlan, precision: str, output, batch: int, device: str = "cpu",
                      force: bool = False, log: Log = lambda m: None) -> int:
    """Builds every transformer package `plan` needs into the folder `output`; returns how many were built
    (present, valid entries are kept)."""
    from ..export.dit_aoti import export_dit_aoti
    from .aoti_backend import cudnn_first

    get_backend("aoti").check_available(device)
    cache = EngineCache(output)
    cache.entries()  # a corrupt manifest stops the build before any work
    reqs = dit_requirements(bundle, plan, precision, batch)
    weights = weights_fingerprint(bundle.transformer)
    ctx = cudnn_first if torch.device(device).type == "cuda" else contextlib.nullcontext
    built = 0
    for n, r in enumerate(reqs, 1):
        key = _key(bundle, r, weights, device)
        tag = f"[{n}/{len(reqs)}] {r.spec.name} (batch {r.batch}, latent {r.latent_w}x{r.latent_h})"
        if not force and cache.lookup(key) is not None:
            log(f"{tag}: up to date, skipped")
            continue
        log(f"{tag}: building for aoti {key.backend_version} on {key.device} ...")
        with cache.staging(key) as tmp:
            res = export_dit_aoti(bundle, r.spec, tmp / "model.pt2", r.batch, r.latent_h, r.latent_w, device=device,
                                  kernel_context=ctx)
            entry = cache.commit(key, tmp)
        built += 1
        log(f"{tag}: done in {res.seconds:.1f} s, {sum(f.size for f in entry.files) / 2**20:.1f} MiB")
    return built


class EngineTransformer:
    """Stands in for the transformer module in `FlowTorchNetworks.transformer_fn`: takes the module's keyword
    arguments, runs the package serving their shapes. FLUX's rotary tables come from the model's own `pos_embed`
    (weightless) on the position ids the networks pass, as the module computes them."""

    def __init__(self, dispatch: ShapeDispatch, kind: str, pos_embed: torch.nn.Module | None,
                 paths: tuple[Path, ...] = ()):
        self.dispatch, self.kind, self.pos_embed = dispatch, kind, pos_embed
        self.paths = paths
        """The package file of each engine in `dispatch.engines`, in order (named by a refused LoRA swap)."""
        self.spec = dispatch.spec
        self.capturable = dispatch.capturable

    def __call__(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, guidance=None,
                 txt_ids=None, img_ids=None, return_dict=False):
        given = {"hidden_states": hidden_states, "timestep": timestep, "guidance": guidance,
                 "encoder_hidden_states": encoder_hidden_states, "pooled_projections": pooled_projections}
        if self.kind == "flux":
            given["rotary_cos"], given["rotary_sin"] = self.pos_embed(torch.cat([txt_ids, img_ids]))
        feeds = {t.name: given[t.name].to(t.torch_dtype).contiguous() for t in self.spec.inputs}
        return (self.dispatch.run(feeds)[self.spec.outputs[0].name],)


def transformer_hint(family: DiTFamily, folder, device: torch.device, precision: str, backend: str = "aoti",
                     them: str = "them") -> str:
    return (f"build {them} with mf-build-engines --model {family.name} --backend {backend} --precision {precision} "
            f"--device {device.type} --output {folder}")


def transformer_entries(folder, family: DiTFamily, device: torch.device, precision: str, backend: str = "aoti",
                        what: str = "transformer packages", them: str = "them") -> list:
    """The folder's `backend` transformer entries for this family, device and precision; EngineError naming the
    build command when there are none."""
    cache = EngineCache(folder)
    mine = [e for e in cache.entries().values() if e.key.model == family.name and e.key.network == TRANSFORMER
            and e.key.device == device_name(device) and e.key.backend == backend and e.key.precision == precision]
    if not mine:
        raise EngineError(f"{folder} holds no {family.name} {what} for {device_name(device)} in "
                          f"{precision}; {transformer_hint(family, folder, device, precision, backend, them)}")
    return mine


def check_entry(e, folder, weights: str, backend: str, version: str, hint: str) -> None:
    """EngineError naming the rebuild command unless entry `e` was built from `weights` by this `backend` version."""
    if e.key.weights != weights:
        raise EngineError(f"{e.key.describe()} in {folder} was built from other weights than this model's; "
                          f"rebuild: {hint}")
    if e.key.backend_version != version:
        raise EngineError(f"{e.key.describe()} in {folder} was built by {backend} {e.key.backend_version}, this is "
                          f"{version}; rebuild: {hint}")


def check_dit_engines(folder, family: DiTFamily, plan: StagePlan, device, precision: str, batch: int) -> None:
    """Before any model load: EngineError unless `folder` holds a package for every stage shape of `plan` at
    transformer batch `batch` (weights and integrity are checked when they are opened)."""
    from ..export.dit_aoti import dit_axes, dit_spec

    device = torch.device(device)
    sample = dit_spec(family, precision).inputs[0]
    held = {p.shapes[0][1] for e in transformer_entries(folder, family, device, precision) for p in e.key.profiles}
    for s in plan.stages:
        shape = sample.concrete(dit_axes(family, batch, s.height // family.vae_scale, s.width // family.vae_scale))
        if shape not in held:
            hint = transformer_hint(family, folder, device, precision)
            raise EngineError(f"{folder} holds no {family.name} transformer package for the {s.width}x{s.height} "
                              f"stage at batch {batch} in {precision}; {hint} "
                              f"--stages/--size as this plan{' --guidance 1' if batch == 1 and family.cfg else ''}")


def open_dit_engines(folder, bundle: DiTBundle, device, precision: str, weights: str | None = None,
                     hint_flags: str = "") -> EngineTransformer:
    """The transformer packages in `folder` built from this bundle's weights (or `weights`, a fingerprint already
    taken) for this device in `precision`, verified; packages of other weights in the folder are left alone.
    EngineError naming what is missing or stale (and the command that builds it, plus `hint_flags`)."""
    from ..export.dit_aoti import dit_spec

    device = torch.device(device)
    fam = bundle.family
    cache = EngineCache(folder)
    hint = transformer_hint(fam, folder, device, precision) + hint_flags
    mine = transformer_entries(folder, fam, device, precision)
    weights = weights_fingerprint(bundle.transformer) if weights is None else weights
    version = get_backend("aoti").version()
    spec = dit_spec(fam, precision, _guidance_embeds(bundle))
    # Packages of other weights (the base model's beside a LoRA's) may share the folder; these weights' serve.
    mine = [e for e in mine if e.key.weights == weights] or mine
    engines, paths = [], []
    for e in sorted(mine, key=lambda e: e.digest):
        check_entry(e, folder, weights, "aoti", version, hint)
        cache.verify(e)
        engines.append((e.key.profiles, StaticPackage(cache.root / e.files[0].path, spec, device)))
        paths.append(cache.root / e.files[0].path)
    return EngineTransformer(ShapeDispatch(tuple(engines)), fam.kind,
                             bundle.transformer.pos_embed if fam.kind == "flux" else None, tuple(paths))


def lora_flags(loras) -> str:
    """` --lora PATH:SCALE` per LoRA, in order: what a rebuild command must add to build from the fused weights."""
    return "".join(f" --lora {spec.path}:{spec.scale!r}" for spec in loras)


def swap_dit_loras(engine: EngineTransformer, bundle: DiTBundle, loras, device, rebuild: str) -> int:
    """The LoRAs' fused transformer weights (`core.lora.fused_weights`, from the bundle's base weights) put into
    every package's constants in place, as engine/lora_swap.py does for the UNet's aoti packages; returns the
    constants replaced. EngineError with `rebuild` for a package that cannot take them (a weight Inductor folded)."""
    from types import SimpleNamespace

    from ..core.lora import fused_weights
    from .aoti_backend import package_constants
    from .backend import WeightSwapError

    device = torch.device(device)
    weights = fused_weights(bundle, list(loras), device).get("transformer", {})
    if not weights:
        return 0
    replaced = 0
    for (_, package), path in zip(engine.dispatch.engines, engine.paths):
        view = SimpleNamespace(model=package.model, spec=package.spec, device=device, path=path)
        try:
            constants = package_constants(view, bundle.transformer, "transformer", weights)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the new tensors are written before the copy reads them
            package.model.load_constants(constants, check_full_update=False)
        except WeightSwapError as e:
            raise EngineError(f"{e}; build packages from the fused weights: {rebuild}") from None
        except (RuntimeError, TypeError) as e:
            raise EngineError(f"{path}: the package did not take new constants ({e}); build packages from the "
                              f"fused weights: {rebuild}") from None
        replaced += len(constants)
    return replaced


def _open_with_loras(folder, bundle: DiTBundle, device, precision: str, loras) -> EngineTransformer:
    """Base-weight packages with the LoRAs swapped in where the folder has them, else packages built from the
    fused weights (mf-build-engines --lora); the bundle's modules are fused either way (the text encoders run in
    torch; the transformer module only lends FLUX its weightless rotary embedding)."""
    from ..core.lora import fuse_loras

    device = torch.device(device)
    base = weights_fingerprint(bundle.transformer)
    flags = lora_flags(loras)
    if any(e.key.weights == base for e in transformer_entries(folder, bundle.family, device, precision)):
        engine = open_dit_engines(folder, bundle, device, precision, base)
        hint = transformer_hint(bundle.family, folder, device, precision)
        swap_dit_loras(engine, bundle, loras, device, hint + flags)
        fuse_loras(bundle, list(loras))
        return engine
    fuse_loras(bundle, list(loras))
    return open_dit_engines(folder, bundle, device, precision, hint_flags=flags)


def engine_networks(bundle: DiTBundle, folder, device, precision: str,
                    vae_dtype: torch.dtype | None = None, loras=()) -> FlowTorchNetworks:
    """`FlowTorchNetworks` whose transformer runs from the packages in `folder` (text encoders, VAE: modules).
    `loras` (core.lora.LoraSpec, checked against the model already): see `_open_with_loras`."""
    nets = FlowTorchNetworks(bundle, vae_dtype)
    engine = (_open_with_loras(folder, bundle, device, precision, loras) if loras
              else open_dit_engines(folder, bundle, device, precision))
    nets.transformer_fn = engine
    nets.capturable = engine.capturable
    return nets


@dataclass(frozen=True)
class DiTEngineKind:
    """How one registered backend builds, checks and opens transformer engines: aoti's static packages per stage
    shape (above), ONNX Runtime's one dynamic engine over the plan's range (engine/dit_onnx_engines.py)."""

    backend: str
    """The backend's registry name (`get_backend` gives its version, availability, capture note, preference)."""
    build: Callable[..., int]
    """(bundle, plan, precision, output, batch, device, force, log) -> engines built."""
    check: Callable[..., None]
    """(folder, family, plan, device, precision, batch): EngineError unless the folder serves the plan."""
    networks: Callable[..., FlowTorchNetworks]
    """(bundle, folder, device, precision, vae_dtype, loras) -> the networks with the transformer from the folder."""
    what: str
    """What its engines are, for messages."""
    takes_lora: bool
    """Whether `networks` takes LoRAs (swapped into the engines, or engines built with them) and `build` fused ones."""
    takes_controlnet: bool = False
    """Whether the backend builds and runs ControlNet engines (engine/dit_controlnet_engines.py: aoti only)."""


def dit_engine_kinds() -> dict[str, DiTEngineKind]:
    """Every backend that builds transformer engines, by registry name (DIT_BACKENDS, in that order)."""
    from . import dit_onnx_engines as ort

    kinds = (DiTEngineKind("aoti", build_dit_engines, check_dit_engines, engine_networks, "packages", True, True),
             DiTEngineKind(ort.BACKEND_NAME, ort.build_dit_onnx_engine, ort.check_dit_onnx_engine,
                           ort.onnx_engine_networks, "engine", False))
    return {k.backend: k for k in kinds}


def choose_dit_engines(folder, family: DiTFamily, plan: StagePlan, device, precision: str, batch: int,
                       graphs: bool) -> tuple[DiTEngineKind, str]:
    """Before any model load: the kind of transformer engines in `folder` to run `plan` from, and a note saying why
    it was chosen when several serve the plan ('' otherwise). Among those that serve it: in graphs mode, one whose
    backend's runners can be captured (`capture_note` ''), then the backends' `preference` on this device.
    EngineError naming what the folder holds and the build command when none serves it."""
    device = torch.device(device)
    kinds = dit_engine_kinds()
    entries = EngineCache(folder).entries().values()
    mine = [e for e in entries if e.key.model == family.name and e.key.network == TRANSFORMER
            and e.key.device == device_name(device) and e.key.precision == precision]
    present = sorted({e.key.backend for e in mine if e.key.backend in kinds}, key=lambda n: _rank(n, device, graphs))
    if not present:
        held = ", ".join(sorted({f"{e.key.model} {e.key.network} {e.key.precision} {e.key.backend} for "
                                 f"{e.key.device}" for e in entries}))
        raise EngineError(f"{folder} holds no {family.name} transformer engines for {device_name(device)} in "
                          f"{precision}{f' (it holds {held})' if held else ''}; build them with "
                          f"mf-build-engines --model {family.name} --backend {'|'.join(kinds)} --precision "
                          f"{precision} --device {device.type} --output {folder}")
    serving, first_error = [], None
    for name in present:
        try:
            kinds[name].check(folder, family, plan, device, precision, batch)
            serving.append(name)
        except EngineError as e:
            first_error = first_error or e
    if not serving:
        raise first_error
    chosen = kinds[serving[0]]
    if len(serving) == 1:
        return chosen, ""
    b = get_backend(chosen.backend)
    why = ("its engines run inside the CUDA graphs of this mode" if graphs and not b.capture_note
           else f"{chosen.backend} is preferred on {device.type}")
    return chosen, (f"{folder} holds {' and '.join(serving)} transformer engines for this plan; running "
                    f"{chosen.backend}: {why}")


def _rank(backend: str, device: torch.device, graphs: bool) -> tuple[bool, int]:
    b = get_backend(backend)
    return graphs and bool(b.capture_note), b.preference.get(device.type, 9)
