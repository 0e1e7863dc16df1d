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
import time
from pathlib import Path

import torch

from megafusion.benchmarks.if_bench import DTYPES, MODES, if_plans, run_if_benchmark
from megafusion.core.if_family import get_if_family
from megafusion.core.if_loading import build_random_if

_plans = if_plans  # the tests' name


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
    dev = torch.device(args.device)
    t = time.perf_counter()
    bundle = build_random_if(fam, 0, dev, torch.float32)
    print(f"built {fam.name} on {dev} in {time.perf_counter() - t:.1f} s", flush=True)
    run_if_benchmark(bundle, dev, Path(args.output), args.dtypes, args.modes, args.repeats, args.cascades,
                     args.engines, args.step_fraction, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
