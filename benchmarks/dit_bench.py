"""mf-bench for SD3 / FLUX (docs/ALGORITHM.md §18): the flow pipeline's modes timed as mf-bench's variants, each
beside a direct row, and with the extra conditions (issue #18) a conditioned row right after each plain row.

Variants: `torch` (the flow loop step by step, FlowMegaFusionPipeline mode eager), `graphs` (one CUDA graph per
stage shape) and `compiled` (graphs around the torch.compile'd transformer), as mf-generate --mode runs them; and
`engines:aoti` / `engines:onnxruntime`, the transformer from an mf-build-engines folder (--engine-dir) as
mf-generate --engines runs it: CUDA-graphed where the backend declares its runners capturable, else eagerly.
How a conditioned row takes the conditions (as mf-generate does, cli/generate_flow.py):
- a LoRA is fused into a copy of the transformer and text encoders, and an IP-Adapter put into a copy of the
  transformer, made before anything runs (the plain rows keep the base weights; both rows hold both copies, so
  their memory compares); the IP-Adapter's image is encoded once, before the rows (not in their times);
- ControlNets wrap the networks' velocity (ControlledFlowNetworks, inside the step each graph captures); without
  a LoRA or an IP-Adapter the plain row's networks are reused;
- image to image: the same networks, started from the photo (fewer steps, one VAE encode).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.plan import StagePlan

from .conditions import Conditions, IPAdapterInput
from .dit_conditions import (DiTIPAdapterCostCounter, dit_conditioned_plan_cost, dit_controlnet_counters)
from .dit_flops import DiTCostCounter, dit_plan_cost
from .variants import ENGINE_FOLDER_PREFIX, Variant, direct_plan

DIT_VARIANTS = {
    "torch": ("eager", "FlowMegaFusionPipeline + FlowTorchNetworks, eager loop"),
    "graphs": ("graphs", "one CUDA graph of the whole step per stage shape, torch modules"),
    "engines:aoti": ("graphs", "the transformer's AOTInductor packages in --engine-dir (text encoders and VAE as "
                     "modules), CUDA-graphed on CUDA"),
    "engines:onnxruntime": ("graphs", "the transformer's ONNX Runtime engine in --engine-dir (text encoders and VAE "
                            "as modules); its stages run eagerly (the backend's runners are not capturable)"),
    "compiled": ("compiled", "CUDA graphs around the torch.compile'd transformer"),
}
"""mf-bench's variant names for the transformer families -> (FlowMegaFusionPipeline mode, description). An
engines:<backend> variant runs in graphs mode only on CUDA and where its backend declares no `capture_note`."""


def engine_mode(kind: str, device) -> str:
    """The pipeline mode a variant runs in on `device`: an engines:<backend> variant eagerly off CUDA or where its
    backend's runners cannot be captured (declared by the backend, never assumed)."""
    mode = DIT_VARIANTS[kind][0]
    if kind.startswith(ENGINE_FOLDER_PREFIX):
        from ..engine.backend import get_backend

        backend = get_backend(kind.removeprefix(ENGINE_FOLDER_PREFIX))
        if torch.device(device).type != "cuda" or backend.capture_note:
            return "eager"
    return mode


@dataclass(frozen=True)
class DiTConditions(Conditions):
    """The extra conditions of one SD3 / FLUX mf-bench run: mf-bench's, the photo entering by the flow rule."""

    def entry(self, plan: StagePlan):
        from ..runtime.flow_img2img import flow_entry_point

        return None if self.image is None else flow_entry_point(plan, self.image.strength, self.image.start_stage)


def dit_cost(plan: StagePlan, conds: DiTConditions | None = None, relay: str = "pixel") -> Callable:
    """A Variant's `cost`: (DiTCostCounter, cfg, dilation) -> PlanCost, the conditions' costs included. The
    ControlNet and IP-Adapter counters are built now (their configs read; ControlInputError or IPAdapterError name
    a file that does not build one) and kept."""
    if not conds:
        return lambda counter, cfg, _dil: dit_plan_cost(counter, plan, cfg, relay)
    made: dict = {}

    def cost(counter: DiTCostCounter, cfg: bool, _dil: int):
        if "cns" not in made:
            made["cns"] = dit_controlnet_counters(counter, [c[0] for c in conds.controls])
            ip = conds.ip_adapter
            made["ip"] = DiTIPAdapterCostCounter(counter.family, ip.path, ip.encoder) if ip else None
        step = made["ip"].transformer if made["ip"] is not None else None
        return dit_conditioned_plan_cost(counter, plan, cfg, relay, made["cns"], conds.entry(plan), step)

    return cost


def _copied(bundle, conds: DiTConditions, device, dtype):
    """A bundle whose transformer (and with a LoRA its text encoders) is a copy with the LoRAs fused and the
    IP-Adapter put in (the VAE is shared), the fuse's seconds, and the IP image's embeddings. LoraError /
    IPAdapterError name a file that does not fit, before anything is timed."""
    from ..core.lora import check_loras, fuse_loras

    if conds.loras:
        check_loras(bundle, list(conds.loras))
    copied = dataclasses.replace(bundle, transformer=copy.deepcopy(bundle.transformer),
                                 text_encoders=[copy.deepcopy(t) for t in bundle.text_encoders]
                                 if conds.loras else bundle.text_encoders)
    fuse_s = None
    if conds.loras:
        t0 = time.perf_counter()
        fuse_loras(copied, list(conds.loras))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        fuse_s = time.perf_counter() - t0
    embeds = None
    if conds.ip_adapter is not None:
        embeds = _ip_adapter(copied, conds.ip_adapter, device, dtype)
    return copied, fuse_s, embeds


def _ip_adapter(bundle, ip: IPAdapterInput, device, dtype) -> torch.Tensor:
    """The IP-Adapter put into `bundle`'s transformer, and the reference image's embeddings (cli/generate_flow.py's
    way)."""
    if bundle.family.kind == "sd3":
        from ..runtime.flow_ipadapter_sd3 import (encode_sd3_ip_image, load_sd3_ip_adapter, load_siglip_encoder,
                                                  read_sd3_ip_adapter)

        state = read_sd3_ip_adapter(ip.path, bundle.transformer)
        encoder, processor = load_siglip_encoder(ip.encoder, device, dtype)
        load_sd3_ip_adapter(bundle.transformer, state, ip.scale, f"--ip-adapter {ip.path!r}")
        embeds = encode_sd3_ip_image(encoder, processor, ip.image, device)
    else:
        from ..runtime.flow_ipadapter import load_flux_ip_adapter, read_flux_ip_adapter
        from ..runtime.ipadapter import encode_ip_image, load_image_encoder

        state = read_flux_ip_adapter(ip.path, bundle.transformer)
        encoder, processor = load_image_encoder(ip.encoder, device, dtype)
        load_flux_ip_adapter(bundle.transformer, state, ip.scale)
        embeds = encode_ip_image(encoder, processor, ip.image, device)
    encoder.to(device="meta")  # done with it
    return embeds


def _conditioned_networks(nets, bundle, conds: DiTConditions, embeds, modules, device):
    """`nets` with the IP-Adapter's embeddings on every call, then the ControlNets on the velocity."""
    if embeds is not None:
        if bundle.family.kind == "sd3":
            from ..runtime.flow_ipadapter_sd3 import SD3IPAdapterNetworks as IPNets
        else:
            from ..runtime.flow_ipadapter import FlowIPAdapterNetworks as IPNets
        nets = IPNets(nets, embeds)
    if conds.controls:
        from ..runtime.controlnet import Control
        from ..runtime.flow_controlnet import ControlledFlowNetworks

        made = [Control(m, image, scale, start, end)
                for m, (_, image, scale, start, end) in zip(modules, conds.controls)]
        nets = ControlledFlowNetworks(nets, made, device)
    return nets


def _lazy(make: Callable):
    """`make()` at first use, then the same object: a variant's pipeline is built after the rows before it ran."""
    made: list = []

    def get():
        if not made:
            made.append(make())
        return made[0]

    return get


def dit_variants(bundle, plan: StagePlan, opts, device, kinds: tuple[str, ...], direct_for: tuple[str, ...] = (),
                 conds: DiTConditions | None = None, vae_dtype=None, cond_cost: Callable | None = None,
                 engine_dir=None, precision: str | None = None) -> list[Variant]:
    """direct (eager, the plan's total steps in one stage at the target size), then per variant in `kinds` (in
    DIT_VARIANTS' order: compiled compiles the shared transformer, so it runs last) its direct row where it is
    in `direct_for`, its row, and with `conds` its conditioned row (role "conditioned", paired with its row).
    `cond_cost`: the conditioned rows' `dit_cost(plan, conds)`, where the caller has made (and checked) it.
    engines:<backend> variants open `engine_dir`'s transformer engines in `precision` (the caller has checked that
    they serve the plan, and the direct plan where asked); conditions do not take them."""
    from ..engine.flow_networks import FlowTorchNetworks
    from ..runtime.flow_pipeline import FlowMegaFusionPipeline

    unknown = [k for k in (*kinds, *direct_for) if k not in DIT_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)} for {bundle.family.name}; known: "
                         f"{', '.join(DIT_VARIANTS)}")
    direct = direct_plan(bundle.family, plan)
    eager = FlowMegaFusionPipeline(bundle, FlowTorchNetworks(bundle, vae_dtype), device, "eager")
    pipes: dict[str, Callable] = {"torch": lambda: eager}
    for kind in kinds:
        if kind.startswith(ENGINE_FOLDER_PREFIX):
            if conds:
                raise ValueError(f"{kind}: the conditioned rows of {bundle.family.name} run the torch variants only")
            pipes[kind] = _lazy(lambda k=kind: FlowMegaFusionPipeline(
                bundle, _engine_networks(bundle, k, engine_dir, device, precision, vae_dtype), device,
                engine_mode(k, device)))
        elif kind != "torch":
            mode = DIT_VARIANTS[kind][0]
            pipes[kind] = _lazy(lambda m=mode: FlowMegaFusionPipeline(
                bundle, FlowTorchNetworks(bundle, compiled=m == "compiled"), device, m))
    out = [Variant("direct", "direct", direct, lambda: eager.generate(direct, opts).timings,
                   f"{direct.total_steps} steps at the target size in one stage (eager flow loop)",
                   pair="engine: torch" if "torch" in kinds else "", cost=dit_cost(direct, relay=opts.relay))]
    cond_rows = _conditioned_rows(bundle, plan, opts, device, kinds, conds, pipes,
                                  cond_cost or dit_cost(plan, conds, opts.relay)) if conds else {}
    for kind in sorted(kinds, key=list(DIT_VARIANTS).index):
        name, get = f"engine: {kind}", pipes[kind]
        if kind in direct_for and kind != "torch":
            out.append(Variant(f"direct ({kind})", "direct", direct,
                               lambda g=get: g().generate(direct, opts).timings,
                               f"{direct.total_steps} steps at the target size in one stage on the networks of "
                               f"'{name}'", pair=name, cost=dit_cost(direct, relay=opts.relay)))
        out.append(Variant(name, "engine", plan, lambda g=get: g().generate(plan, opts).timings,
                           DIT_VARIANTS[kind][1], cost=dit_cost(plan, relay=opts.relay)))
        if name in cond_rows:
            out.append(cond_rows[name])
    return out


def _engine_networks(bundle, kind: str, engine_dir, device, precision: str, vae_dtype):
    """The flow networks whose transformer runs from `engine_dir`'s engines of the variant's backend."""
    from ..engine.dit_engines import dit_engine_kinds

    backend = kind.removeprefix(ENGINE_FOLDER_PREFIX)
    return dit_engine_kinds()[backend].networks(bundle, engine_dir, device, precision, vae_dtype)


def _conditioned_rows(bundle, plan, opts, device, kinds, conds: DiTConditions, pipes, cost) -> dict[str, Variant]:
    """One conditioned row per variant, by its plain row's name; ControlNets loaded and checked against the
    transformer, LoRAs fused and the IP-Adapter put into a copy, all before anything is timed."""
    from ..engine.flow_networks import FlowTorchNetworks
    from ..runtime.flow_controlnet import load_flow_controlnet
    from ..runtime.flow_pipeline import FlowMegaFusionPipeline

    dtype = bundle.transformer.dtype
    modules = [load_flow_controlnet(c[0], bundle.transformer, bundle.family, device, dtype) for c in conds.controls]
    own = bool(conds.loras or conds.ip_adapter)  # rows on a copy of the weights, with networks of their own
    copied, fuse_s, embeds = _copied(bundle, conds, device, dtype) if own else (bundle, None, None)
    label = conds.label()
    out = {}
    for kind in kinds:
        mode = DIT_VARIANTS[kind][0]
        if own:
            get = _lazy(lambda m=mode: FlowMegaFusionPipeline(copied, _conditioned_networks(
                FlowTorchNetworks(copied, compiled=m == "compiled"), copied, conds, embeds, modules, device),
                device, m))
        elif conds.controls:
            get = _lazy(lambda m=mode, k=kind: FlowMegaFusionPipeline(bundle, _conditioned_networks(
                pipes[k]().nets, bundle, conds, None, modules, device), device, m))
        else:
            get = pipes[kind]
        setup = (lambda s=fuse_s: s) if fuse_s is not None else None
        name = f"engine: {kind}"
        out[name] = Variant(f"{name} + {label}", "conditioned", plan,
                            lambda g=get: g().generate(plan, opts, image=conds.image).timings,
                            f"'{name}' with {label}", pair=name, setup=setup,
                            setup_label="LoRA fused into a copy of the weights, once" if setup else "", cost=cost)
    return out


def dit_cost_variants(family, plan: StagePlan, conds: DiTConditions | None = None, relay: str = "pixel",
                      cond_cost: Callable | None = None) -> list[Variant]:
    """The cost-only report's rows: direct, MegaFusion and with `conds` the conditioned plan."""
    def nothing():
        return []

    direct = direct_plan(family, plan)
    out = [Variant("direct", "direct", direct, nothing, "one stage at the target size", cost=dit_cost(direct,
                                                                                                        relay=relay)),
           Variant("MegaFusion", "engine", plan, nothing, "the stage plan", cost=dit_cost(plan, relay=relay))]
    if conds:
        label = conds.label()
        out.append(Variant(f"MegaFusion + {label}", "conditioned", plan, nothing, f"the stage plan with {label}",
                           pair="MegaFusion", cost=cond_cost or dit_cost(plan, conds, relay)))
    return out


DIT_NOTES = [
    "SD3 / FLUX: the transformer's cost per step (CFG batch 2 for SD3 at guidance > 1, FLUX one pass); 'paper "
    "G-MACs' are its Linear/Conv multiply-accumulates, true TFLOP add attention; the VAE passes as for the UNet "
    "families; text encoders are not counted. There is no diffusers eager baseline row: the 'torch' variant calls "
    "the modules as diffusers' pipelines call them.",
]

DIT_CONDITIONS_NOTE = (
    "Conditioned rows ('<row> + <conditions>') run right after their plain row, in the same process. A LoRA is "
    "fused into, and an IP-Adapter put into, a copy of the weights made before any row runs (both rows then hold "
    "both copies); the IP-Adapter's image is encoded once, outside the times. ControlNet forwards are counted at "
    "every step (their scale is zero outside [start, end], not skipped) and their control images' encodes in "
    "'control images'; the IP-Adapter's image attention and projection in every step; image to image counts the "
    "photo's encode and only the steps run.")
