"""DeepFloyd IF on one GPU: each cascade stage's MegaFusion plan against its direct plan, same engine (the eager
torch modules), float32 as the paper and float16 beside it (docs/ALGORITHM.md §20, paper Table 1).

    python3 benchmarks/lab/if_megafusion.py --output DIR [--model if] [--dtypes fp32,fp16] [--repeats 2]

Random weights (IF-I-XL, IF-II-L, T5-XXL; the built-in tokenizer): the cost and the code path are those of the
real model. Stage I: 128x128 for 100 steps (direct) against 64/80 -> 128/20; stage II: 512x512 for 50 steps
against 256/40 -> 512/10, both conditioned on the same 128x128 stage I image. CFG 7.0 and 4.0. Each plan is
warmed up once (one step at each of its sizes), then timed `repeats` times, synchronised; the median is kept.
The text encoder runs once per dtype and is not in the stage times. Writes DIR/if_megafusion.json and .md.
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
from megafusion.runtime.pixel_pipeline import IFMegaFusionPipeline, PixelOptions, pixel_plan

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
PAPER_SECONDS = {"I direct": 77.08, "I megafusion": 32.19, "II direct": 48.58, "II megafusion": 21.72}
"""Table 1's times on an A40, float32."""


def _plans(fam):
    (h1, w1, _), (h2, w2, _) = fam.stages_1[-1], fam.stages_2[-1]
    n1, n2 = sum(s[2] for s in fam.stages_1), sum(s[2] for s in fam.stages_2)
    return {
        ("I", "direct"): pixel_plan(fam, 1, [Stage(h1, w1, n1)]),
        ("I", "megafusion"): pixel_plan(fam, 1),
        ("II", "direct"): pixel_plan(fam, 2, [Stage(h2, w2, n2)]),
        ("II", "megafusion"): pixel_plan(fam, 2),
    }


def _warm_plan(plan: StagePlan) -> StagePlan:
    """One step at each of the plan's sizes (and dilations): first-call and autotuning costs stay out of the times."""
    return StagePlan(tuple(Stage(s.height, s.width, 1) for s in plan.stages), plan.output_height, plan.output_width)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/if_megafusion.py")
    p.add_argument("--output", required=True)
    p.add_argument("--model", default="if")
    p.add_argument("--dtypes", default="fp32,fp16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    fam = get_if_family(args.model)
    plans = _plans(fam)
    counter = IFCostCounter(fam)
    t = time.perf_counter()
    bundle = build_random_if(fam, 0, dev, torch.float32)
    print(f"built {fam.name} on {dev} in {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        for unet in (bundle.unet_1, bundle.unet_2):
            unet.to(dtype)  # the T5 encoder stays float32 (T5 overflows in fp16); its output is cast
        pipe = IFMegaFusionPipeline(bundle, dev)
        opts = PixelOptions("a photo of a red fox in a forest", seed=0)
        with torch.no_grad():
            states = pipe.encode(opts.prompt, "", cfg=True).to(dtype)
            low = None
            for (cascade, kind), plan in plans.items():
                c = 1 if cascade == "I" else 2
                w = opts.guidance_1 if c == 1 else opts.guidance_2

                def run(pl):
                    _sync(dev)
                    t0 = time.perf_counter()
                    x = pipe.run_cascade(c, pl, states, w, opts, torch.Generator().manual_seed(0), low_res=low)
                    _sync(dev)
                    return x, time.perf_counter() - t0

                run(_warm_plan(plan))
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                times = []
                for _ in range(args.repeats):
                    x, s = run(plan)
                    times.append(s)
                if c == 1 and kind == "megafusion":
                    low = x  # stage II's input: stage I's MegaFusion output (the paper's 128x128 image)
                cost = counter.plan(c, plan, cfg=True)
                sec = statistics.median(times)
                paper_key = f"if stage {cascade} {'128' if c == 1 else '512'} {kind}"
                rows.append({
                    "dtype": name, "cascade": cascade, "kind": kind, "plan": plan.describe(), "seconds": sec,
                    "all_seconds": times, "paper_gmacs_ours": cost.macs / 1e9,
                    "paper_gmacs_table1": PAPER_TABLE1_IF_GMACS.get(paper_key), "true_tflop": cost.flops / 1e12,
                    "tflop_per_s": cost.flops / 1e12 / sec, "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
                    "finite": bool(torch.isfinite(x).all()), "paper_a40_seconds": PAPER_SECONDS[f"{cascade} {kind}"],
                })
                print(json.dumps(rows[-1]), flush=True)
                # Kept as it goes: a run stopped by a time limit still leaves every row it finished.
                (out / "if_megafusion.partial.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        direct = next(d for d in rows if d["dtype"] == r["dtype"] and d["cascade"] == r["cascade"]
                      and d["kind"] == "direct")
        r["speedup_vs_direct"] = direct["seconds"] / r["seconds"]
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, **provenance()}
    (out / "if_megafusion.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    lines = [f"# IF MegaFusion vs direct on {env['device']} ({env['date_utc']}, commit {env['commit']})", "",
             f"`{env['command']}`; torch {env['torch']}, cuDNN TF32 {env['cudnn_allow_tf32']}, "
             f"matmul TF32 {env['matmul_allow_tf32']}; random weights; median of {args.repeats}.", "",
             "| dtype | stage | plan | s | speedup | paper A40 s (fp32) | G-MACs ours | Table 1 | TFLOP/s | peak GiB | finite |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['cascade']} {r['kind']} | {r['plan']} | {r['seconds']:.2f} | "
                     f"{r['speedup_vs_direct']:.2f} | {r['paper_a40_seconds']} | {r['paper_gmacs_ours']:,.0f} | "
                     f"{r['paper_gmacs_table1']:,.0f} | {r['tflop_per_s']:.1f} | {r['peak_gib']:.1f} | {r['finite']} |")
    (out / "if_megafusion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
