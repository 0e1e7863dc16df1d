"""DeepFloyd IF's MegaFusion plans against direct on one engine, in each mode of the pixel pipeline: the rows of
`benchmarks/lab/if_megafusion.py` and `mf-bench --model if` (docs/ALGORITHM.md §20, paper Table 1).

Modes: `eager`, `graphs`, `compiled` (IFMegaFusionPipeline's) and `engines` (the UNet engines of an engine folder,
in graphs mode where their backend can be captured, else eager). Stage I: 128x128 for 100 steps (direct) against
64/80 -> 128/20; stage II: 512x512 for 50 steps against 256/40 -> 512/10, conditioned on stage I's MegaFusion
image; CFG 7.0 and 4.0. Each plan is warmed up once (eager: one step at each of its sizes; graph modes: the whole
plan, which captures and compiles, its time kept as `first_seconds`), then timed `repeats` times, synchronised;
the median is kept. The text encoder runs once per dtype and mode and is not in the stage times.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.if_loading import IFBundle
from ..core.plan import Stage, StagePlan
from ..runtime.pixel_pipeline import PIXEL_MODES, IFMegaFusionPipeline, PixelOptions, pixel_plan
from .flops import PAPER_TABLE1_IF_GMACS, IFCostCounter
from .timing import provenance

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MODES = PIXEL_MODES + ("engines",)
PAPER_SECONDS = {"I direct": 77.08, "I megafusion": 32.19, "II direct": 48.58, "II megafusion": 21.72}
"""Table 1's times on an A40, float32."""


def if_plans(fam, fraction: float = 1.0) -> dict[tuple[str, str], StagePlan]:
    (h1, w1, _), (h2, w2, _) = fam.stages_1[-1], fam.stages_2[-1]
    n1, n2 = sum(s[2] for s in fam.stages_1), sum(s[2] for s in fam.stages_2)

    def cut(stages):
        return [Stage(h, w, max(1, round(n * fraction))) for h, w, n in stages]

    return {
        ("I", "direct"): pixel_plan(fam, 1, cut([(h1, w1, n1)])),
        ("I", "megafusion"): pixel_plan(fam, 1, cut(fam.stages_1)),
        ("II", "direct"): pixel_plan(fam, 2, cut([(h2, w2, n2)])),
        ("II", "megafusion"): pixel_plan(fam, 2, cut(fam.stages_2)),
    }


def warm_plan(plan: StagePlan) -> StagePlan:
    """One step at each of the plan's sizes (and dilations): first-call and autotuning costs stay out of the times."""
    return StagePlan(tuple(Stage(s.height, s.width, 1) for s in plan.stages), plan.output_height, plan.output_width)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _pipeline(bundle, dev: torch.device, mode: str, engines: str | None, dtype_name: str,
              engine_backend: str | None = None) -> IFMegaFusionPipeline:
    if mode != "engines":
        return IFMegaFusionPipeline(bundle, dev, mode)
    from ..engine.if_engines import open_if_engines

    nets = open_if_engines(engines, bundle, dev, precision=dtype_name, backend=engine_backend)
    return IFMegaFusionPipeline(bundle, dev, "graphs" if nets.capturable else "eager", networks=nets)


def measure(bundle: IFBundle, dev, plans, dtype_name: str, mode: str, repeats: int, counter: IFCostCounter,
            cascades: tuple[str, ...], engines: str | None, log, engine_backend: str | None = None) -> list[dict]:
    """The rows of one dtype and mode: every plan of the cascades asked for, warmed up, then timed."""
    dtype = DTYPES[dtype_name]
    if mode != "engines":  # engines run in their own precision; their keys hash the float32 weights left as built
        for unet in (bundle.unet_1, bundle.unet_2):
            unet.to(dtype)  # the T5 encoder stays float32 (T5 overflows in fp16); its output is cast
    pipe = _pipeline(bundle, dev, mode, engines, dtype_name, engine_backend)
    opts = PixelOptions("a photo of a red fox in a forest", seed=0)
    rows = []
    label = f"engines:{pipe.nets.backend}" if mode == "engines" else mode
    tiny = bundle.family.tiny  # Table 1's figures are the real model's
    with torch.no_grad():
        states = pipe.encode(opts.prompt, "", cfg=True)
        low = None
        if "II" in cascades and "I" not in cascades:  # stage II's input, untimed, eager: nothing compiled for it
            low = IFMegaFusionPipeline(bundle, dev).run_cascade(1, plans[("I", "megafusion")], states,
                                                                opts.guidance_1, opts, torch.Generator().manual_seed(0))
        for (cascade, kind), plan in plans.items():
            if cascade not in cascades:
                continue
            c = 1 if cascade == "I" else 2
            w = opts.guidance_1 if c == 1 else opts.guidance_2

            def run(pl):
                _sync(dev)
                t0 = time.perf_counter()
                x = pipe.run_cascade(c, pl, states, w, opts, torch.Generator().manual_seed(0), low_res=low)
                _sync(dev)
                return x, time.perf_counter() - t0

            # Graphs are captured per stage descriptor with the stage's step count: warm up on the plan itself.
            _, first = run(warm_plan(plan) if pipe.graphs is None else plan)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = []
            for _ in range(repeats):
                x, s = run(plan)
                times.append(s)
            if c == 1 and kind == "megafusion":
                low = x  # stage II's input: stage I's MegaFusion output (the paper's 128x128 image)
            cost = counter.plan(c, plan, cfg=True)
            sec = statistics.median(times)
            side = "128" if c == 1 else "512"  # Table 1's output sides
            rows.append({
                "dtype": dtype_name, "mode": label, "runs_as": pipe.mode, "cascade": cascade, "kind": kind,
                "plan": plan.describe(), "seconds": sec, "all_seconds": times, "first_seconds": first,
                "captures": pipe.graphs.captures if pipe.graphs else 0,
                "paper_gmacs_ours": cost.macs / 1e9,
                "paper_gmacs_table1": None if tiny else PAPER_TABLE1_IF_GMACS[f"if stage {cascade} {side} {kind}"],
                "true_tflop": cost.flops / 1e12, "tflop_per_s": cost.flops / 1e12 / sec,
                "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
                "finite": bool(torch.isfinite(x).all()),
                "paper_a40_seconds": None if tiny else PAPER_SECONDS[f"{cascade} {kind}"],
            })
            log(rows[-1])
    if mode == "compiled":  # what compiling left on the modules: later modes run them as before
        for unet in (bundle.unet_1, bundle.unet_2):
            unet.to(memory_format=torch.contiguous_format)
    return rows


def _same(r: dict, d: dict, *fields: str) -> bool:
    return all(r.get(f) == d.get(f) for f in fields)


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_direct: the same dtype and mode's direct plan over this one; vs_eager: the same plan in eager."""
    for r in rows:
        direct = next((d for d in rows if _same(r, d, "dtype", "mode", "cascade") and d["kind"] == "direct"), None)
        eager = next((d for d in rows if _same(r, d, "dtype", "cascade", "kind") and d["mode"] == "eager"), None)
        r["speedup_vs_direct"] = direct["seconds"] / r["seconds"] if direct else None
        r["speedup_vs_eager"] = eager["seconds"] / r["seconds"] if eager else None


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(rows: list[dict], env: dict, runs: list[dict]) -> str:
    lines = [f"# IF MegaFusion vs direct on {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN TF32 {env['cudnn_allow_tf32']}, matmul TF32 "
             f"{env['matmul_allow_tf32']}; random weights. Runs (date, commit, command):", ""]
    lines += [f"- {r['date_utc']}, {r['commit']}{' (dirty)' if r.get('dirty') else ''}: `{r['command']}`" for r in runs]
    lines += ["", "s: median of the timed runs; first s: the warm-up (captures and compiles included in graphs and "
              "compiled). G-MACs: the paper's convention (conv + linear of the UNet, CFG as batch 2).", "",
              "| dtype | mode | stage | plan | s | first s | vs direct | vs eager | paper A40 s (fp32) | G-MACs ours "
              "| Table 1 | TFLOP | TFLOP/s | peak GiB | finite |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mode = r["mode"] + (f" ({r['runs_as']})" if r.get("runs_as", r["mode"]) != r["mode"] else "")
        lines.append(f"| {r['dtype']} | {mode} | {r['cascade']} {r['kind']} | {r['plan']} | {r['seconds']:.2f} | "
                     f"{r['first_seconds']:.2f} | {_num(r['speedup_vs_direct'], '.2f')} | "
                     f"{_num(r['speedup_vs_eager'], '.2f')} | {_num(r['paper_a40_seconds'], '.2f')} | "
                     f"{r['paper_gmacs_ours']:,.0f} | "
                     f"{_num(r['paper_gmacs_table1'], ',.0f')} | {r['true_tflop']:.2f} | {r['tflop_per_s']:.2f} | "
                     f"{r['peak_gib']:.1f} | {r['finite']} |")
    return "\n".join(lines) + "\n"


def run_if_benchmark(bundle: IFBundle, dev: torch.device, out: Path, dtypes: list[str], modes: list[str],
                     repeats: int, cascades: tuple[str, ...] = ("I", "II"), engines: str | None = None,
                     fraction: float = 1.0, log: Callable[[str], None] = print,
                     engine_backend: str | None = None) -> list[dict]:
    """Measures every (dtype, mode), merges the rows into OUT/if_megafusion.json (rows of other pairs already
    there are kept) and writes OUT/if_megafusion.md; returns the merged rows."""
    out.mkdir(parents=True, exist_ok=True)
    plans = if_plans(bundle.family, fraction)
    counter = IFCostCounter(bundle.family)
    report = out / "if_megafusion.json"
    old = json.loads(report.read_text()) if report.exists() else {"rows": [], "runs": []}
    rows: list[dict] = []
    partial: list[dict] = []

    def keep(row):
        log(json.dumps(row))
        partial.append(row)  # kept as it goes: a run stopped by a time limit still leaves every row it finished
        (out / "if_megafusion.partial.json").write_text(json.dumps(partial, indent=1))

    for dtype_name in dtypes:
        for mode in modes:
            rows += measure(bundle, dev, plans, dtype_name, mode, repeats, counter, cascades, engines, keep,
                            engine_backend)
    done = {(r["dtype"], r["mode"], r["cascade"], r["kind"]) for r in rows}
    rows = [r for r in old["rows"] if (r["dtype"], r["mode"], r["cascade"], r["kind"]) not in done] + rows
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r["dtype"] != "fp32", r["cascade"], order.get(r["mode"], 9), r["kind"]))
    add_ratios(rows)
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    runs = old.get("runs", []) + [{**provenance(), "step_fraction": fraction}]
    report.write_text(json.dumps({"environment": env, "runs": runs, "rows": rows}, indent=1))
    text = markdown(rows, env, runs)
    (out / "if_megafusion.md").write_text(text)
    log(text)
    return rows
