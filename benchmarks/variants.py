"""What gets timed: a list of named generators. A new backend of the engine is one more `Variant`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..engine.networks import TorchNetworks
from ..core.loading import ModelBundle
from ..core.families import ModelFamily
from ..core.plan import Stage, StagePlan, validate_plan
from ..runtime.pipeline import GenerationOptions, MegaFusionPipeline

from .baseline_eager import megafusion_eager

ROLES = ("direct", "baseline", "engine")
"""direct: one stage at the target size; baseline: diffusers modules called eagerly; engine: ours."""


@dataclass(frozen=True)
class Variant:
    """One way of producing the image, timed as a whole and per segment."""

    name: str
    """Row label in the report."""
    role: str
    """One of ROLES; speedups are every engine row over the direct and baseline rows."""
    plan: StagePlan
    """The plan it runs (its cost is counted from this)."""
    generate: Callable[[], list[tuple[str, float]]]
    """One generation; returns its (segment, seconds) breakdown."""
    description: str
    """One line for the report."""


def direct_plan(family: ModelFamily, plan: StagePlan) -> StagePlan:
    """The same total steps in one stage at the final size: plain generation at the target resolution."""
    last = plan.stages[-1]
    return validate_plan(family, [Stage(last.height, last.width, plan.total_steps)],
                         plan.output_width, plan.output_height)


def engine_variant(name: str, pipe: MegaFusionPipeline, plan: StagePlan, opts: GenerationOptions,
                   description: str) -> Variant:
    return Variant(name, "engine", plan, lambda: pipe.generate(plan, opts).timings, description)


ENGINES = {
    "torch": "MegaFusionPipeline + TorchNetworks, eager loop",
    "graphs": "one CUDA graph per stage shape (UNet, CFG, DDIM update), torch modules",
    "compiled": "CUDA graphs around torch.compile'd UNet and VAE, channels_last, fused QKV, fused relay kernel",
    "compiled-fp8": "compiled, with the UNet in bf16 and its transformer projections as FP8 (e4m3) GEMMs",
}
"""Engine variants mf-bench knows; `compiled` changes the shared modules, so it runs after the others but
`compiled-fp8`, which quantizes them."""


def _lazy_engine(kind: str, bundle: ModelBundle, device) -> Callable[[], MegaFusionPipeline]:
    made: list[MegaFusionPipeline] = []

    def get() -> MegaFusionPipeline:
        if not made:  # built at first use, after the variants before it have run
            if kind == "graphs":
                made.append(MegaFusionPipeline.fast(bundle, TorchNetworks(bundle), device))
            elif kind == "compiled-fp8":  # quantizes the shared UNet in place: the last variant to run
                import torch

                from ..engine.fp8 import Fp8Policy
                from ..engine.torch_fast import FastOptions, FastTorchNetworks

                # Row-wise FP8 GEMMs write bf16; nn.Module.to, since diffusers' .to warns about fp32 modules.
                torch.nn.Module.to(bundle.unet, dtype=torch.bfloat16)
                nets = FastTorchNetworks(bundle, FastOptions(unet_fp8=Fp8Policy()))
                made.append(MegaFusionPipeline.fast(bundle, nets, device))
            else:
                from ..engine.torch_fast import FastTorchNetworks

                made.append(MegaFusionPipeline.fast(bundle, FastTorchNetworks(bundle), device))
        return made[0]

    return get


def default_variants(bundle: ModelBundle, plan: StagePlan, opts: GenerationOptions, device,
                     engines: tuple[str, ...] = ("torch",)) -> list[Variant]:
    """(a) direct, (b) the eager diffusers-style baseline, (c) the engine on each asked-for backend."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine variant(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    pipe = MegaFusionPipeline(bundle, TorchNetworks(bundle), device)
    direct = direct_plan(bundle.family, plan)

    def eager():
        return megafusion_eager(bundle, plan, opts.prompt, opts.negative_prompt, opts.guidance, opts.seed,
                                opts.reschedule, opts.dilation).timings

    if opts.relay != "pixel":
        raise ValueError("the eager baseline implements the paper's pixel relay only")
    return [
        Variant("direct", "direct", direct, lambda: pipe.generate(direct, opts).timings,
                f"{direct.total_steps} steps at the target size in one stage (engine, torch modules)"),
        Variant("diffusers eager", "baseline", plan, eager,
                "MegaFusion with the diffusers modules called eagerly, DDIMScheduler per stage"),
        *(_engine(kind, pipe, bundle, plan, opts, device) for kind in sorted(engines, key=_engine_order)),
    ]


def _engine_order(kind: str) -> int:
    return list(ENGINES).index(kind)


def _engine(kind: str, pipe: MegaFusionPipeline, bundle: ModelBundle, plan: StagePlan, opts: GenerationOptions,
            device) -> Variant:
    if kind == "torch":
        return engine_variant("engine: torch", pipe, plan, opts, ENGINES[kind])
    get = _lazy_engine(kind, bundle, device)
    return Variant(f"engine: {kind}", "engine", plan, lambda: get().generate(plan, opts).timings, ENGINES[kind])
