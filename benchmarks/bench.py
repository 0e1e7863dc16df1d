"""One benchmark run: every variant timed in one process, each beside its cost and the machine's peak."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.families import SDXL, ModelFamily
from ..core.plan import StagePlan

from .flops import SDXL_NOTE, MetaCostCounter, PlanCost, achieved, plan_cost
from .paper import PaperRow
from .timing import Environment, Measurement, measure, peak_matmul_tflops
from .variants import Variant, direct_plan


@dataclass(frozen=True)
class SegmentRow:
    """One segment of one variant: its median time beside its cost."""

    name: str
    """Segment as the generator names it (text encoders, stage k, relay k->k+1, decode)."""
    kind: str
    """`text`, `stage`, `relay`, `encode` (image to image's photo) or `decode`."""
    median_s: float | None
    """Median seconds over the timed repeats (None when nothing was timed)."""
    paper_gmacs: float
    """Paper-convention G-MACs (UNet conv/linear, CFG batch 2)."""
    true_tflop: float
    """True TFLOP (2 per MAC, attention and VAE included)."""
    attention_tflop: float
    """The part of `true_tflop` in attention matmuls."""
    tflop_per_s: float | None
    """Achieved TFLOP/s in this segment."""
    fraction_of_peak: float | None
    """Achieved over the peak TFLOP/s."""


@dataclass(frozen=True)
class VariantResult:
    """One variant's timings and cost."""

    name: str
    """Row label."""
    role: str
    """direct, baseline or engine."""
    description: str
    """What it is."""
    plan: str
    """The plan it ran, described."""
    totals_s: list[float]
    """Total seconds of each timed repeat."""
    median_s: float | None
    """Median total seconds."""
    paper_gmacs: float
    """Paper-convention G-MACs of the whole plan."""
    true_tflop: float
    """True TFLOP of UNet steps, relays and the final decode (text encoders excluded)."""
    text_tflop: float
    """True TFLOP of the text encoders, listed apart."""
    tflop_per_s: float | None
    """true_tflop over the median total time."""
    fraction_of_peak: float | None
    """tflop_per_s over the peak."""
    segments: list[SegmentRow]
    """Per-segment breakdown."""
    pair: str = ""
    """For a direct row: the engine row it shares its networks with (compared with it in `speedups`)."""
    first_s: float | None = None
    """The first generation's seconds (compiles, captures, cuDNN's algorithm search)."""
    first_peak_gib: tuple[float, float] | None = None
    """(allocated, reserved) peak GiB during the first generation (CUDA)."""
    steady_peak_gib: tuple[float, float] | None = None
    """(allocated, reserved) peak GiB over the timed generations (CUDA)."""
    setup_s: float | None = None
    """Seconds of the row's set-up, not in its times (a LoRA fused or swapped into the engines), if it has one."""
    setup: str = ""
    """What that set-up was."""


@dataclass(frozen=True)
class Speedup:
    """How much faster an engine variant is than another row (median over median)."""

    engine: str
    """The engine variant."""
    over: str
    """The row it is compared with."""
    factor: float
    """other's median time / engine's median time."""


@dataclass
class BenchResult:
    """Everything one run measured, as results.json holds it."""

    model: str
    """Model family."""
    settings: dict
    """Dtypes, repeats, warm-up, prompt, guidance, seed, plan options."""
    environment: Environment
    """Machine, driver, library versions, date."""
    peak_tflop_per_s: float | None
    """The peak held results against (measured fp16 matmul or given)."""
    peak_source: str | None
    """Where the peak came from."""
    variants: list[VariantResult]
    """One entry per variant, in the order run."""
    speedups: list[Speedup]
    """Every engine variant over the direct and the baseline rows."""
    paper: list[PaperRow] = field(default_factory=list)
    """Table 1's cost rows beside ours (real SD1.5 / SDXL runs only)."""
    notes: list[str] = field(default_factory=list)
    """Conventions the reader must know."""
    cold_starts: list = field(default_factory=list)
    """Fresh processes to the first image (`benchmarks.cold_start.ColdStart`), when asked for."""


def segment_rows(cost: PlanCost, timed: list[tuple[str, float]] | None, peak: float | None) -> list[SegmentRow]:
    """Cost segments joined with timed segments by position (both follow the pipeline's order)."""
    times = [s for _, s in timed] if timed and len(timed) == len(cost.segments) else None
    rows = []
    for i, c in enumerate(cost.segments):
        t = times[i] if times else None
        thr = achieved(c.true_tflop, t, peak) if t else None
        rows.append(SegmentRow(c.name, c.kind, t, c.paper_gmacs, c.true_tflop, c.attention_tflop,
                               thr.tflop_per_s if thr else None, thr.fraction_of_peak if thr else None))
    return rows


def _gib(pair: tuple[int, int] | None) -> tuple[float, float] | None:
    return None if pair is None else (pair[0] / 2**30, pair[1] / 2**30)


def variant_result(v: Variant, cost: PlanCost, m: Measurement | None, peak: float | None,
                   setup_s: float | None = None) -> VariantResult:
    median = m.median_s if m else None
    thr = achieved(cost.true_tflop, median, peak) if median else None
    return VariantResult(
        v.name, v.role, v.description, v.plan.describe(), list(m.totals_s) if m else [], median,
        cost.paper_gmacs, cost.true_tflop, cost.text_tflop, thr.tflop_per_s if thr else None,
        thr.fraction_of_peak if thr else None, segment_rows(cost, m.segment_medians() if m else None, peak),
        v.pair, m.first_s if m else None, _gib(m.first_peak) if m else None, _gib(m.steady_peak) if m else None,
        setup_s, v.setup_label)


def speedups(results: list[VariantResult]) -> list[Speedup]:
    """Each engine row over the baseline rows, and over the direct row run on the same networks (`pair`) where
    there is one, else over the plain `direct` row (torch modules, eager)."""
    out = []
    for e in (r for r in results if r.role == "engine" and r.median_s):
        paired = [r for r in results if r.role == "direct" and r.pair == e.name and r.median_s]
        others = [r for r in results if r.role == "baseline" and r.median_s]
        others += paired or [r for r in results if r.role == "direct" and r.name == "direct" and r.median_s]
        for o in others:
            out.append(Speedup(e.name, o.name, o.median_s / e.median_s))
    return out


def notes(family: ModelFamily) -> list[str]:
    out = [
        "Paper-convention G-MACs: multiply-accumulates of Conv2d and Linear layers only, UNet only, CFG as "
        "batch 2 (the paper's Table 1 'GFLOPs'). Dilation does not change them.",
        "True TFLOP: 2 per MAC, attention matmuls included (torch FlopCounterMode on the meta device); the "
        "total is UNet steps + VAE decode/encode of each relay + final decode; text encoders listed apart.",
        "Timing: CUDA events around each generation on GPU (perf_counter after synchronize on CPU), median "
        "of the repeats after warm-up; segments are the generator's own synchronized marks.",
        "'direct' is the engine running the same total steps in one stage at the target size; 'direct (X)' runs "
        "it on the same networks as 'engine: X', and each engine is compared with its own direct row.",
        "Memory: peak allocated / reserved device memory of the first generation (compiles, graph captures and "
        "cuDNN's algorithm search included) and of the timed ones (steady state).",
    ]
    if family.name == SDXL.name:
        out.append(SDXL_NOTE)
    return out


CONDITIONS_NOTE = (
    "Conditioned rows ('<row> + <conditions>') run right after their plain row, in the same process. A LoRA is fused "
    "into a copy of the UNet and text encoders made before any row runs (both rows then hold both copies), or "
    "swapped into the opened engines after their plain row (the set-up column; not in the times); ControlNet "
    "forwards are counted in every step's cost, image to image counts the photo's encode and only the steps run. "
    "An IP-Adapter is put into a copy of the UNet (torch variants), its image encoded once outside the times and its "
    "image attention counted in every step.")


def run_variants(variants: list[Variant], family: ModelFamily, device: torch.device, repeats: int,
                 warmup: int, peak: float | None, counter: MetaCostCounter | None = None,
                 cfg: bool = True, dilation: int = 2, time_them: bool = True,
                 log=print) -> list[VariantResult]:
    """Times each variant (unless `time_them` is off) and joins its cost."""
    counter = counter or MetaCostCounter(family)
    out = []
    for v in variants:
        cost = v.cost(counter, cfg, dilation) if v.cost else plan_cost(counter, v.plan, cfg=cfg, dilation=dilation)
        m = setup_s = None
        if time_them and v.setup is not None:
            setup_s = v.setup()
            log(f"set-up of {v.name}: {v.setup_label}, {setup_s:.2f} s")
        if time_them:
            log(f"timing {v.name}: {v.plan.describe()} ({warmup} warm-up, {repeats} timed)")
            m = measure(v.generate, device, repeats, warmup)
            log(f"  median {m.median_s * 1000:.1f} ms")
        out.append(variant_result(v, cost, m, peak, setup_s))
    return out


def cost_variants(family: ModelFamily, plan: StagePlan, conditions=None, relay: str = "pixel") -> list[Variant]:
    """Direct and MegaFusion rows with nothing to run: the cost-only report; with `conditions`
    (benchmarks.conditions.Conditions) the conditioned plan's row after them."""
    def nothing():
        return []

    out = [Variant("direct", "direct", direct_plan(family, plan), nothing, "one stage at the target size"),
           Variant("MegaFusion", "engine", plan, nothing, "the stage plan")]
    if conditions:
        from .conditions import conditioned_cost, controlnet_counters, ip_adapter_counter

        cns = controlnet_counters(family, conditions.controls)
        ip = ip_adapter_counter(family, conditions)
        label = conditions.label()
        out.append(Variant(f"MegaFusion + {label}", "conditioned", plan, nothing, f"the stage plan with {label}",
                           pair="MegaFusion", cost=lambda counter, cfg, dil: conditioned_cost(
                               conditions, counter, plan, cfg, relay, dil, cns, ip)))
    return out


def resolve_peak(device: torch.device, given: float | None, measure_it: bool, log=print):
    """(peak TFLOP/s, where it came from): given, measured on the GPU, or none."""
    if given:
        return given, "given on the command line"
    if measure_it and device.type == "cuda":
        value = peak_matmul_tflops(device)
        log(f"peak: 8192^3 fp16 matmul {value:.0f} TFLOP/s")
        return value, "measured: 8192^3 fp16 matmul, this run"
    return None, None
