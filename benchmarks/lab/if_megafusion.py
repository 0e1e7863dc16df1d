"""DeepFloyd IF on one GPU: each cascade stage's MegaFusion plan against its direct plan on the same engine, float32
as the paper and float16 beside it, in each mode of the pixel pipeline (docs/ALGORITHM.md §20, paper Table 1).

    python3 benchmarks/lab/if_megafusion.py --output DIR [--model if] [--dtypes fp32,fp16] [--repeats 2]
        [--modes eager,graphs,compiled] [--cascades I,II] [--engines DIR]

Modes: `eager` (step by step), `graphs` (one CUDA graph per stage descriptor), `compiled` (graphs around
torch.compile'd UNets), `engines` (the UNet engines in --engines, built by engine/if_engines.build_if_engines, run
in graphs mode where their backend can be captured, else eagerly). Random weights (IF-I-XL, IF-II-L, T5-XXL,
initialised on the device; the built-in tokenizer): the cost and the code path are those of the real model.
Stage I: 128x128 for 100 steps (direct) against 64/80 -> 128/20; stage II: 512x512 for 50 steps against
256/40 -> 512/10, both conditioned on the same 128x128 stage I image. CFG 7.0 and 4.0. Each plan is warmed up
once (eager: one step at each of its sizes; graphs and compiled: the whole plan, which captures and compiles, its
time kept as `first_seconds`), then timed `repeats` times, synchronised; the median is kept. The text encoder
runs once per dtype and is not in the stage times. GFLOPs (IFCostCounter: the paper's G-MACs and true TFLOP)
stand beside the times, and Table 1's figures beside ours.

Writes DIR/if_megafusion.json and .md; rows already in DIR/if_megafusion.json for other (dtype, mode) pairs are
kept, so several runs (one per mode, within a time limit each) make one report. `--step-fraction` shortens every
plan (each stage keeps at least one step): the default is 1 (the paper's plans), 0.05 for the tiny model on the
CPU, where this script is a smoke test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from megafusion.benchmarks.flops import PAPER_TABLE1_IF_GMACS, IFCostCounter
from megafusion.benchmarks.timing import provenance
from megafusion.core.if_family import get_if_family
from megafusion.core.if_loading import build_random_if
from megafusion.core.plan import Stage, StagePlan
from megafusion.runtime.pixel_pipeline import PIXEL_MODES, IFMegaFusionPipeline, PixelOptions, pixel_plan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MODES = PIXEL_MODES + ("engines",)
PAPER_SECONDS = {"I direct": 77.08, "I megafusion": 32.19, "II direct": 48.58, "II megafusion": 21.72}
"""Table 1's times on an A40, float32."""


def _plans(fam, fraction: float = 1.0) -> dict[tuple[str, str], StagePlan]:
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


def _warm_plan(plan: StagePlan) -> StagePlan:
    """One step at each of the plan's sizes (and dilations): first-call and autotuning costs stay out of the times."""
    return StagePlan(tuple(Stage(s.height, s.width, 1) for s in plan.stages), plan.output_height, plan.output_width)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _pipeline(bundle, dev: torch.device, mode: str, engines: str | None, dtype_name: str) -> IFMegaFusionPipeline:
    if mode != "engines":
        return IFMegaFusionPipeline(bundle, dev, mode)
    from megafusion.engine.if_engines import open_if_engines

    nets = open_if_engines(engines, bundle, dev, precision=dtype_name)
    return IFMegaFusionPipeline(bundle, dev, "graphs" if nets.capturable else "eager", networks=nets)


def measure(bundle, dev, plans, dtype_name: str, mode: str, repeats: int, counter: IFCostCounter,
            cascades: tuple[str, ...], engines: str | None, log) -> list[dict]:
    """The rows of one dtype and mode: every plan of the cascades asked for, warmed up, then timed."""
    dtype = DTYPES[dtype_name]
    if mode != "engines":  # engines run in their own precision; their keys hash the float32 weights left as built
        for unet in (bundle.unet_1, bundle.unet_2):
            unet.to(dtype)  # the T5 encoder stays float32 (T5 overflows in fp16); its output is cast
    pipe = _pipeline(bundle, dev, mode, engines, dtype_name)
    opts = PixelOptions("a photo of a red fox in a forest", seed=0)
    rows = []
    tiny = bundle.family.tiny  # Table 1's figures are the real model's
    with torch.no_grad():
        states = pipe.encode(opts.prompt, "", cfg=True)
        low = None
        if "II" in cascades and "I" not in cascades:  # stage II's input, untimed
            low = pipe.run_cascade(1, plans[("I", "megafusion")], states, opts.guidance_1, opts,
                                   torch.Generator().manual_seed(0))
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
            _, first = run(_warm_plan(plan) if pipe.graphs is None else plan)
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
            rows.append({
                "dtype": dtype_name, "mode": mode, "runs_as": pipe.mode, "cascade": cascade, "kind": kind,
                "plan": plan.describe(), "seconds": sec, "all_seconds": times, "first_seconds": first,
                "captures": pipe.graphs.captures if pipe.graphs else 0,
                "paper_gmacs_ours": cost.macs / 1e9,
                "paper_gmacs_table1": None if tiny else PAPER_TABLE1_IF_GMACS[f"if stage {cascade} {'128' if c == 1 else '512'} {kind}"],
                "true_tflop": cost.flops / 1e12, "tflop_per_s": cost.flops / 1e12 / sec,
                "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
                "finite": bool(torch.isfinite(x).all()), "paper_a40_seconds": None if tiny else PAPER_SECONDS[f"{cascade} {kind}"],
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
                     f"{_num(r['speedup_vs_eager'], '.2f')} | {_num(r['paper_a40_seconds'], '.2f')} | {r['paper_gmacs_ours']:,.0f} | "
                     f"{_num(r['paper_gmacs_table1'], ',.0f')} | {r['true_tflop']:.2f} | {r['tflop_per_s']:.2f} | "
                     f"{r['peak_gib']:.1f} | {r['finite']} |")
    return "\n".join(lines) + "\n"


def _parse(argv):
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/if_megafusion.py")
    p.add_argument("--output", required=True)
    p.add_argument("--model", default="if")
    p.add_argument("--dtypes", help="comma-separated, of fp32, fp16 (default: both on CUDA, fp32 on the CPU)")
    p.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)} (default: eager,graphs,compiled on CUDA, "
                                   "eager,graphs on the CPU)")
    p.add_argument("--cascades", default="I,II", help="which cascade stages to time (default: %(default)s)")
    p.add_argument("--engines", metavar="DIR", help="with --modes engines: the IF engine folder")
    p.add_argument("--repeats", type=int, help="timed runs per plan (default: 2 on CUDA, 1 on the CPU)")
    p.add_argument("--step-fraction", type=float, help="scale every stage's steps (default: 1; 0.05 for tiny models)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    fam = get_if_family(args.model)
    args.dtypes = (args.dtypes or ("fp32,fp16" if cuda else "fp32")).split(",")
    args.modes = (args.modes or ("eager,graphs,compiled" if cuda else "eager,graphs")).split(",")
    args.cascades = tuple(args.cascades.split(","))
    args.repeats = args.repeats or (2 if cuda else 1)
    args.step_fraction = args.step_fraction or (0.05 if fam.tiny else 1.0)
    for name, values, known in (("--dtypes", args.dtypes, DTYPES), ("--modes", args.modes, MODES),
                                ("--cascades", args.cascades, ("I", "II"))):
        bad = [v for v in values if v not in known]
        if bad:
            p.error(f"{name}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(known)}")
    if ("engines" in args.modes) != (args.engines is not None):
        p.error("--modes engines and --engines DIR go together")
    if "engines" in args.modes and len(args.modes) > 1:
        p.error("--modes engines runs alone: the other modes cast the UNets, whose float32 weights the engines check")
    if not 0 < args.step_fraction <= 1:
        p.error(f"--step-fraction {args.step_fraction}: give a number in (0, 1]")
    return args, fam


def main(argv=None) -> int:
    args, fam = _parse(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    plans = _plans(fam, args.step_fraction)
    counter = IFCostCounter(fam)
    t = time.perf_counter()
    bundle = build_random_if(fam, 0, dev, torch.float32)
    print(f"built {fam.name} on {dev} in {time.perf_counter() - t:.1f} s", flush=True)
    report = out / "if_megafusion.json"
    old = json.loads(report.read_text()) if report.exists() else {"rows": [], "runs": []}
    rows = []

    def log(row):
        print(json.dumps(row), flush=True)
        # Kept as it goes: a run stopped by a time limit still leaves every row it finished.
        (out / "if_megafusion.partial.json").write_text(json.dumps(rows, indent=1))

    for dtype_name in args.dtypes:
        for mode in args.modes:
            rows += measure(bundle, dev, plans, dtype_name, mode, args.repeats, counter, args.cascades,
                            args.engines, log)
    done = {(r["dtype"], r["mode"], r["cascade"], r["kind"]) for r in rows}
    rows = [r for r in old["rows"] if (r["dtype"], r["mode"], r["cascade"], r["kind"]) not in done] + rows
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r["dtype"] != "fp32", r["cascade"], order.get(r["mode"], 9), r["kind"]))
    add_ratios(rows)
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    runs = old.get("runs", []) + [{**provenance(), "step_fraction": args.step_fraction}]
    report.write_text(json.dumps({"environment": env, "runs": runs, "rows": rows}, indent=1))
    text = markdown(rows, env, runs)
    (out / "if_megafusion.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
