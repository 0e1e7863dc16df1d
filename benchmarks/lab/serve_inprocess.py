"""What one mf-serve replica does, in this process without Ray or HTTP: the in-process steady state to set the
server's latency against, and batched throughput (requests denoised together) against one at a time.

python benchmarks/lab/serve_inprocess.py --model sdxl --random-weights --device cuda --size 2048x2048 \\
    --batches 1 --repeats 5 --output DIR
python benchmarks/lab/serve_inprocess.py --model sd15 --random-weights --device cuda --size 1024x1024 \\
    --batches 1,4,8,16 --repeats 3 --output DIR

It builds the replica's `ModelServer` (serve/model.py: the same networks, mode and warm-up as mf-serve), then for
each batch size B: one untimed group (captures B's CUDA graphs), then `--repeats` timed groups of B requests with
their own prompts and seeds, the default plan for `--size`. Writes inprocess.json and inprocess.md into DIR:
median seconds per group, images per second, and the per-image timings share of the last group.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megafusion.benchmarks.timing import environment
from megafusion.serve.config import ServeConfig, parse_sizes
from megafusion.serve.model import ModelServer
from megafusion.serve.request import parse_request


def measure(server: ModelServer, size: str, batch: int, repeats: int) -> dict:
    def group(offset: int):
        reqs = [parse_request({"prompt": f"a lighthouse at dusk, view {offset + j}", "size": size,
                               "seed": offset + j}, server.family, server.cfg.served_sizes) for j in range(batch)]
        t0 = time.perf_counter()
        out = server.generate_group(reqs)
        if server.device.type == "cuda":
            torch.cuda.synchronize(server.device)
        return time.perf_counter() - t0, out

    group(10_000)  # untimed: captures this batch size's graphs (or compiles)
    times, last = [], None
    for r in range(repeats):
        seconds, last = group(r * batch)
        times.append(seconds)
    med = statistics.median(times)
    return {"batch": batch, "group_s": times, "median_group_s": med, "images_per_s": batch / med,
            "timings_ms_share": last[0].timings_ms, "peak_memory_bytes": last[0].peak_memory_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--model-path")
    p.add_argument("--device", default="cuda")
    p.add_argument("--mode", choices=("eager", "graphs", "compiled"))
    p.add_argument("--size", required=True, help="WxH, served as mf-serve --sizes")
    p.add_argument("--batches", default="1", help="batch sizes to time, e.g. 1,4,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if min(batches) < 1 or args.repeats < 1:
        print(f"serve_inprocess: error: --batches {args.batches} / --repeats {args.repeats}: need integers >= 1",
              file=sys.stderr)
        return 2
    cfg = ServeConfig(args.model, args.model_path, args.random_weights, device=args.device, mode=args.mode,
                      sizes=parse_sizes(args.size), max_batch=max(batches))
    t0 = time.perf_counter()
    server = ModelServer(cfg)
    warm = server.warm_up()
    env = environment(server.device)
    results = {"environment": asdict(env), "config": cfg.to_dict(),
               "load_and_warm_s": time.perf_counter() - t0, "warm_up": warm, "mode": server.mode,
               "levels": [measure(server, args.size, b, args.repeats) for b in batches]}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inprocess.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    base = results["levels"][0]["images_per_s"]
    lines = [f"# {args.model} {args.size} in process ({server.mode}, {args.device}): one replica's work",
             "", f"- command: `{env.command}`; commit {env.commit}{' (dirty)' if env.dirty else ''}; "
             f"{env.device_name}, torch {env.torch}", "",
             "| batch | median s per group | images/s | vs first row |", "|---:|---:|---:|---:|"]
    for lv in results["levels"]:
        lines.append(f"| {lv['batch']} | {lv['median_group_s']:.3f} | {lv['images_per_s']:.3f} | "
                     f"{lv['images_per_s'] / base:.2f}x |")
    (out / "inprocess.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
