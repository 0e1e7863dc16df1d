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

ROLES = ("direct", "baseline", "engine", "conditioned")
"""direct: one stage at the target size; baseline: diffusers modules called eagerly; engine: ours; conditioned: an
engine row with the extra conditions (benchmarks/conditions.py), compared with its plain row."""


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
    pair: str = ""
    """For a direct row: the name of the engine row whose networks it runs; for a conditioned row, its plain row."""
    setup: Callable[[], float] | None = None
    """Run once before the row is timed (a LoRA swapped into engines); returns its seconds, reported apart."""
    setup_label: str = ""
    """What `setup` does, in words."""
    cost: Callable | None = None
    """(MetaCostCounter, cfg, dilation) -> PlanCost, where the plan's cost is not `plan_cost`'s (conditions)."""


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
    "engines:aoti": "AOTInductor packages from mf-build-engines (--engine-dir), CUDA-graphed where capturable",
    "engines:aoti-fp8": "the FP8 AOTInductor packages in --engine-dir (mf-build-engines --precision fp8: UNet "
                        "projections as FP8 GEMMs, the rest bf16), CUDA-graphed",
    "engines:aoti-fp8-static": "the FP8 AOTInductor packages with static input scales in --engine-dir "
                               "(mf-build-engines --precision fp8 --fp8-scales static: calibrated per stage shape)",
    "engines:onnxruntime": "ONNX Runtime engines from mf-build-engines (--engine-dir), stages run eagerly",
    "compiled": "CUDA graphs around torch.compile'd UNet and VAE, channels_last, fused QKV, fused relay kernel",
    "compiled-fp8": "compiled, with the UNet in bf16 and its transformer projections as FP8 (e4m3) GEMMs",
    "compiled-fp8-static": "compiled-fp8 with static input scales (calibrated at the plan's stage shapes, kept in "
                           "--compile-cache)",
}
"""Engine variants mf-bench knows; `compiled` changes the shared modules, so it runs after the others but the
FP8 ones, which quantize them."""
FP8_COMPILED = ("compiled-fp8", "compiled-fp8-static")
"""Variants that quantize the shared UNet in place: at most one per run (the order of ENGINES runs it last)."""

ENGINE_FOLDER_PREFIX = "engines:"
"""Variants named `engines:<backend>` run the built engines of that backend from `--engine-dir`."""
FP8_SUFFIX = "-fp8"
"""`engines:<backend>-fp8` runs the folder's FP8 engines of that backend."""
FP8_STATIC_SUFFIX = "-fp8-static"
"""`engines:<backend>-fp8-static` runs its FP8 engines with static input scales."""


def engine_folder_variant(kind: str) -> tuple[str, str | None]:
    """(backend, precision) an `engines:<backend>[-fp8[-static]]` variant opens: fp8, or None for the device's
    default among those built (FP8 ones only when asked for)."""
    name = kind.removeprefix(ENGINE_FOLDER_PREFIX)
    for suffix in (FP8_STATIC_SUFFIX, FP8_SUFFIX):
        if name.endswith(suffix):
            return name.removesuffix(suffix), "fp8"
    return name, None


def engine_folder_scales(kind: str) -> str:
    """Which FP8 packages an `engines:` variant opens: `static` for `-fp8-static`, else `token`."""
    return "static" if kind.endswith(FP8_STATIC_SUFFIX) else "token"


def _fp8_policy(kind: str):
    from ..engine.fp8 import Fp8Policy

    return Fp8Policy(activations="static" if kind == "compiled-fp8-static" else "token")


def _fp8_networks(kind: str, bundle: ModelBundle, scales=None):
    """The compiled networks of an FP8 variant (FP8_COMPILED): the shared UNet cast to bf16 (row-wise FP8 GEMMs write
    bf16) and quantized; `scales`: the static variant's provider (runtime/fp8_calibration.py
    `static_scales_provider`, made when the row was set up, before any variant changed the module)."""
    import torch

    from ..engine.torch_fast import FastOptions, FastTorchNetworks

    # nn.Module.to, since diffusers' .to warns about fp32 modules.
    torch.nn.Module.to(bundle.unet, dtype=torch.bfloat16)
    return FastTorchNetworks(bundle, FastOptions(unet_fp8=_fp8_policy(kind)), fp8_scales=scales)


def _lazy_engine(kind: str, bundle: ModelBundle, device, plan: StagePlan | None = None,
                 opts: GenerationOptions | None = None, engine_dir=None,
                 compile_cache=None, wrap=None) -> Callable[[], MegaFusionPipeline]:
    """`wrap(nets)`: networks around the variant's (ControlNets), for conditioned rows; torch variants only."""
    made: list[MegaFusionPipeline] = []
    scales = None
    if kind == "compiled-fp8-static":  # now, while the module is as loaded (its origin's fingerprint, no hashing)
        from ..engine.fp8_scales import ScaleStore
        from ..runtime.fp8_calibration import static_scales_provider

        store = ScaleStore(compile_cache) if compile_cache is not None else None
        scales = static_scales_provider(bundle, _fp8_policy(kind), plan, opts.dilation, opts.guidance > 1.0, device,
                                        store, lambda line: print(f"{kind}: {line}", flush=True))

    def fast(nets) -> MegaFusionPipeline:
        return MegaFusionPipeline.fast(bundle, wrap(nets) if wrap else nets, device)

    def get() -> MegaFusionPipeline:
        if not made:  # built at first use, after the variants before it have run
            if kind == "graphs":
                made.append(fast(TorchNetworks(bundle)))
            elif kind.startswith(ENGINE_FOLDER_PREFIX):
                made.append(_engine_pipeline(*engine_folder_variant(kind), bundle, device, plan, opts, engine_dir,
                                             engine_folder_scales(kind)))
            elif kind in FP8_COMPILED:  # quantizes the shared UNet in place: the last variant to run
                made.append(fast(_fp8_networks(kind, bundle, scales)))
            else:
                from ..engine.torch_fast import FastTorchNetworks

                nets = FastTorchNetworks(bundle)
                if compile_cache is not None:  # as mf-generate --mode compiled starts
                    from ..engine.compile_cache import CompileCache, cacheable, compile_key

                    if not cacheable(nets):
                        CompileCache(compile_cache).attach(nets, compile_key(nets, device, plan, opts.relay,
                                                                             opts.guidance > 1.0))
                made.append(fast(nets))
        return made[0]

    return get


def _engine_pipeline(backend: str, precision: str | None, bundle: ModelBundle, device, plan: StagePlan,
                     opts: GenerationOptions, engine_dir, fp8_scales: str = "token") -> MegaFusionPipeline:
    """The built engines of `backend` (in `precision`, None: the device's default) that run `plan`, CUDA-graphed
    where they can be captured."""
    import torch

    from ..engine.load import open_engines

    dilation = opts.dilation if len(plan.stages) > 1 else 1  # a one-stage (direct) plan runs no dilated UNet
    nets, _ = open_engines(engine_dir, bundle, plan, dilation, opts.relay, device, backend, precision,
                           fp8_scales=fp8_scales)
    if torch.device(device).type == "cuda" and nets.capturable:
        return MegaFusionPipeline.fast(bundle, nets, device)
    return MegaFusionPipeline(bundle, nets, device)


def default_variants(bundle: ModelBundle, plan: StagePlan, opts: GenerationOptions, device,
                     engines: tuple[str, ...] = ("torch",), engine_dir=None,
                     direct_for: tuple[str, ...] = (), compile_cache=None,
                     engine_bundle: ModelBundle | None = None, conditions=None) -> list[Variant]:
    """(a) direct, (b) the eager diffusers-style baseline, (c) the engine on each asked-for backend, each engine
    in `direct_for` preceded by its own direct row (the same total steps in one stage on the same networks).
    Built engines open against `engine_bundle` (the model as mf-build-engines loaded it: random weights are
    initialised on the CPU there, and a GPU initialises other values from the same seed), else `bundle`.
    `conditions` (benchmarks.conditions.Conditions): each engine row is followed by its conditioned row, before
    the next variant changes the shared modules."""
    unknown = [e for e in (*engines, *direct_for) if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine variant(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    if any(e.startswith(ENGINE_FOLDER_PREFIX) for e in engines) and engine_dir is None:
        raise ValueError("engines:<backend> variants need the engine folder (--engine-dir)")
    pipe = MegaFusionPipeline(bundle, TorchNetworks(bundle), device)
    direct = direct_plan(bundle.family, plan)

    def eager():
        return megafusion_eager(bundle, plan, opts.prompt, opts.negative_prompt, opts.guidance, opts.seed,
                                opts.reschedule, opts.dilation).timings

    if opts.relay != "pixel":
        raise ValueError("the eager baseline implements the paper's pixel relay only")
    out = [
        Variant("direct", "direct", direct, lambda: pipe.generate(direct, opts).timings,
                f"{direct.total_steps} steps at the target size in one stage (engine, torch modules)",
                pair="engine: torch" if "torch" in engines else ""),
        Variant("diffusers eager", "baseline", plan, eager,
                "MegaFusion with the diffusers modules called eagerly, DDIMScheduler per stage"),
    ]
    gets = {"torch": lambda: pipe}
    for kind in sorted(engines, key=_engine_order):
        if kind == "torch":
            out.append(engine_variant("engine: torch", pipe, plan, opts, ENGINES[kind]))
            continue
        own = kind.startswith(ENGINE_FOLDER_PREFIX)
        src = engine_bundle if own and engine_bundle is not None else bundle
        get = gets[kind] = _lazy_engine(kind, src, device, plan, opts, engine_dir, compile_cache)
        if own:
            get()  # opened now: engines that do not cover the plan are refused before anything is timed
        if kind in direct_for:  # torch modules serve any plan; built engines open the direct plan's own shapes
            get_direct = _lazy_engine(kind, src, device, direct, opts, engine_dir) if own else get
            if own:
                get_direct()
            out.append(Variant(f"direct ({kind})", "direct", direct,
                               lambda g=get_direct: g().generate(direct, opts).timings,
                               f"{direct.total_steps} steps at the target size in one stage on the networks of "
                               f"'engine: {kind}'", pair=f"engine: {kind}"))
        out.append(Variant(f"engine: {kind}", "engine", plan, lambda g=get: g().generate(plan, opts).timings,
                           ENGINES[kind]))
    if conditions:
        from .conditions import conditioned_variants

        def lazy_torch(kind, other, wrap):
            return _lazy_engine(kind, other, device, plan, opts, wrap=wrap)

        rows = conditioned_variants(bundle, plan, opts, device, tuple(engines), conditions, gets, engine_dir,
                                    engine_bundle, lazy_torch)
        out = [x for v in out for x in ([v, rows[v.name]] if v.name in rows else [v])]
    return out


def _engine_order(kind: str) -> int:
    return list(ENGINES).index(kind)
