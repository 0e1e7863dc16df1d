"""Why a fresh process's first image from engines is slower than the next ones: two generations in one process,
each segment timed (text encoders, stages, relays, decode), the CUDA graph captures apart (their warm-up steps
included), and the device memory each generation peaked at (allocated and reserved).

    python benchmarks/lab/first_image.py --engines DIR --cudnn-benchmark on --output OUT -- \
        --model sdxl --random-weights --size 2048x2048

`--cudnn-benchmark` sets `torch.backends.cudnn.benchmark` after the engines open (the aoti backend turns it on
there): with it on, cuDNN times its algorithms for every new convolution shape during the first generation
(slower first image, workspaces tried, perhaps more memory reserved); off, cuDNN's heuristics pick at once. Run
it once each way, each a fresh process, to see what the search costs and what it buys in the steady state.
Writes first_image.json into OUT.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from megafusion.benchmarks.cold_start import first_image_line
from megafusion.benchmarks.timing import provenance
from megafusion.cli.common import plan_from_args
from megafusion.core.families import get_family
from megafusion.core.loading import load_model
from megafusion.engine.load import open_engines, select_engines
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", required=True)
    p.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on")
    p.add_argument("--device", default="cuda")
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--output", required=True)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- --model M [--random-weights] [--size WxH]")
    a = p.parse_args()
    q = argparse.ArgumentParser()
    q.add_argument("--model", required=True)
    q.add_argument("--random-weights", action="store_true")
    q.add_argument("--size")
    q.add_argument("--stages")
    q.add_argument("--prompt", default="a lighthouse")
    m = q.parse_args([x for x in a.rest if x != "--"])
    device = torch.device(a.device)
    fam = get_family(m.model)
    plan = plan_from_args(fam, m.size, m.stages)
    t0 = time.perf_counter()
    served = select_engines(a.engines, fam, "random:0" if fam.tiny or m.random_weights else fam.hub_id, plan,
                            device=device).modules_served()
    bundle = load_model(m.model, random_weights=m.random_weights, skip=served)
    t1 = time.perf_counter()
    phases: dict[str, float] = {}
    nets, desc = open_engines(a.engines, bundle, plan, device=device, timings=phases)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark == "on"
    pipe = MegaFusionPipeline.fast(bundle, nets, device) if device.type == "cuda" else \
        MegaFusionPipeline(bundle, nets, device)
    out = {"provenance": provenance(), "engines": desc, "cudnn_benchmark": a.cudnn_benchmark,
           "load_s": t1 - t0, **phases, "generations": []}
    print(f"{desc}: model load {t1 - t0:.2f} s, open {phases['open']:.2f} s", flush=True)
    for i in range(a.generations):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        captures, capture_s = (pipe.graphs.captures, pipe.graphs.capture_seconds) if pipe.graphs else (0, 0.0)
        t = time.perf_counter()
        r = pipe.generate(plan, GenerationOptions(m.prompt, seed=i))
        wall = time.perf_counter() - t
        g = {"wall_s": wall, "segments": r.timings}
        if pipe.graphs:
            captures, capture_s = pipe.graphs.captures - captures, pipe.graphs.capture_seconds - capture_s
        g.update(captures=captures, capture_s=capture_s)
        if device.type == "cuda":
            g.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                     peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
        out["generations"].append(g)
        print(f"generation {i + 1}: {wall:.2f} s; " + first_image_line(r.timings, captures, capture_s)
              .removeprefix("cold-start first image: ")
              + (f"; peak {g['peak_allocated_gib']:.1f} GiB allocated, {g['peak_reserved_gib']:.1f} reserved"
                 if device.type == "cuda" else ""), flush=True)
    Path(a.output).mkdir(parents=True, exist_ok=True)
    (Path(a.output) / "first_image.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
