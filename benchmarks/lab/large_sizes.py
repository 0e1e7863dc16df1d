"""4096 and beyond on one GPU: MegaFusion with pixel relay, with latent relay, and direct generation, side by side.

python benchmarks/lab/large_sizes.py --model sdxl --size 4096x4096 --runs pixel,latent,direct --output DIR

Random weights. Each run: the memory plan (estimate per segment, VAE tiling, parked or not, chosen for the
device's memory or --max-memory), --warmup untimed generations (graph captures), then --repeats timed ones;
per-segment times, peak allocated and reserved memory against the estimate, the process's peak host memory,
and each image's difference to the first run's (mean absolute difference in 8-bit levels, PSNR). Writes
large_sizes.json, large_sizes.md and 1024-pixel previews into DIR. A run whose estimate exceeds the budget is
recorded as skipped, with the estimate.

SDXL 8192 on the H200 (the VAE parked in host memory, chosen by the budget):
python benchmarks/lab/large_sizes.py --model sdxl --size 8192x8192 --runs latent,pixel --max-memory 64 --warmup 0 \
    --output DIR

--mode: `graphs` (plain torch modules in whole-step CUDA graphs, as mf-generate --mode graphs), `fast-graphs` (the
same graphs over the compiled path's module changes without compiling: channels_last, fused QKV, cuDNN attention
in the UNet, blockwise VAE attention), `compiled` (those modules compiled, as mf-generate --mode compiled: the
warm-up compiles every stage shape, minutes at real size), `eager`.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
from pathlib import Path

import numpy as np
import torch

from megafusion.benchmarks.timing import provenance
from megafusion.core.loading import load_model
from megafusion.core.memory import GiB
from megafusion.core.plan import Stage, default_plan, parse_size, validate_plan
from megafusion.core.specs import default_vae_dtype
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.memory_plan import MODES, plan_memory
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from megafusion.runtime.vae_tiling import TiledVaeNetworks, VaeTiling

RUNS = ("pixel", "latent", "direct")


def _plan(family, name: str, width: int, height: int):
    if name == "direct":  # one stage at the output size, the same 50 steps
        m = family.pixel_multiple
        last = Stage(-(-height // m) * m, -(-width // m) * m, default_plan(family, width, height).total_steps)
        return validate_plan(family, [last], width, height)
    return default_plan(family, width, height)


MODES_RUN = ("graphs", "fast-graphs", "compiled", "eager")


def _networks(bundle, mode: str, vae_dtype, dev):
    """The stages' networks for --mode; the fast ones change the modules in place, so they are made once."""
    if mode in ("graphs", "eager"):
        return TorchNetworks(bundle, vae_dtype)
    from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks, fast_graphs_options

    options = FastOptions() if mode == "compiled" else fast_graphs_options(dev)  # as mf-generate --mode ...
    return FastTorchNetworks(bundle, options, vae_dtype=vae_dtype)


def _one(bundle, base, name, plan, args, dev, vae_dtype, limit):
    relay = "latent" if name == "latent" else "pixel"
    memory = plan_memory(bundle.family, plan, bundle.unet.dtype, vae_dtype, limit, args.guidance > 1, relay,
                         args.vae_tile, VaeTiling(args.tile_size), graph_pool=args.mode != "eager")
    row = {"run": name, "plan": plan.describe(), "relay": relay, "estimate_lines": memory.describe(),
           "estimated_peak_gib": memory.estimate.peak_bytes / GiB,
           "estimated_segments": [(n, p / GiB) for n, p in memory.estimate.stage_peaks()],
           "vae_tiling": memory.tiling.tile if memory.tiling else None, "vae_tiling_why": memory.why,
           "vae_parked": bool(memory.tiling and memory.tiling.park),
           "estimated_host_gib": memory.estimate.host_bytes / GiB}
    if not memory.fits:
        row["skipped"] = f"estimate {row['estimated_peak_gib']:.1f} GiB exceeds the budget {limit / GiB:.1f} GiB"
        print(f"{name}: skipped, {row['skipped']}")
        return row, None
    nets = base if args.mode != "graphs" else TorchNetworks(bundle, vae_dtype)
    if memory.tiling:
        nets = TiledVaeNetworks(nets, bundle.vae, memory.tiling)
    pipe = (MegaFusionPipeline.fast(bundle, nets, dev) if args.mode != "eager"
            else MegaFusionPipeline(bundle, nets, dev))
    opts = GenerationOptions(args.prompt, guidance=args.guidance, seed=args.seed, relay=relay)
    try:
        for _ in range(args.warmup):
            pipe.generate(plan, opts)  # warm-up: captures the graphs, loads kernels
        runs = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            res = pipe.generate(plan, opts)
            runs.append((res, torch.cuda.max_memory_reserved() if dev.type == "cuda" else 0))
    except torch.OutOfMemoryError as e:
        row["failed"] = f"out of memory: {str(e).splitlines()[0]}"
        print(f"{name}: {row['failed']}")
        return row, None
    finally:
        del pipe, nets
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    res = runs[-1][0]
    names = [n for n, _ in res.timings]
    row["segments_s"] = [(n, statistics.median(r.timings[i][1] for r, _ in runs)) for i, n in enumerate(names)]
    row["total_s"] = statistics.median(sum(s for _, s in r.timings) for r, _ in runs)
    row["peak_allocated_gib"] = max(r.peak_memory_bytes or 0 for r, _ in runs) / GiB  # CUDA only
    row["peak_reserved_gib"] = max(p for _, p in runs) / GiB
    row["peak_host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # whole process
    print(f"{name}: {row['total_s']:.2f} s, peak allocated {row['peak_allocated_gib']:.2f} GiB, reserved "
          f"{row['peak_reserved_gib']:.2f} GiB (estimate {row['estimated_peak_gib']:.2f} GiB, VAE "
          f"{_vae(row)}); process peak host memory {row['peak_host_rss_gib']:.1f} GiB")
    return row, res.image


def _vae(row: dict) -> str:
    if not row["vae_tiling"]:
        return "untiled"
    return f"tiled {row['vae_tiling']}" + (f", parked ({row['estimated_host_gib']:.1f} GiB host)"
                                          if row.get("vae_parked") else "")


def _difference(a: np.ndarray, b: np.ndarray) -> dict:
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float((d * d).mean())
    return {"mean_abs_levels": float(np.abs(d).mean()),
            "psnr_db": float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)}


def _table(rows: list[dict]) -> str:
    out = ["| run | plan | VAE | total s | peak alloc GiB | peak reserved GiB | estimate GiB | host peak GiB "
           "| vs first run |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "total_s" not in r:
            out.append(f"| {r['run']} | {r['plan']} | | {r.get('skipped') or r.get('failed')} | | | "
                       f"{r['estimated_peak_gib']:.2f} | | |")
            continue
        diff = r.get("difference")
        vs = "" if diff is None else f"{diff['mean_abs_levels']:.2f} levels, {diff['psnr_db']:.1f} dB"
        vae = _vae(r)
        out.append(f"| {r['run']} | {r['plan']} | {vae} | {r['total_s']:.2f} | {r['peak_allocated_gib']:.2f} | "
                   f"{r['peak_reserved_gib']:.2f} | {r['estimated_peak_gib']:.2f} | {r['peak_host_rss_gib']:.1f} "
                   f"| {vs} |")
    for r in rows:
        if "segments_s" in r:
            out += ["", f"**{r['run']}** per segment (s), beside the estimated peak of each memory segment:", ""]
            out += [f"- {n}: {s:.3f}" for n, s in r["segments_s"]]
            out += [f"- estimate: {line.strip()}" for line in r["estimate_lines"]]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--size", default="4096x4096", help="WIDTHxHEIGHT")
    p.add_argument("--runs", default="pixel,latent,direct", help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--mode", choices=MODES_RUN, default="graphs")
    p.add_argument("--vae-tile", choices=MODES, default="auto",
                   help="auto: untiled, tiled, or tiled with parking, the first that fits the budget")
    p.add_argument("--tile-size", type=int, default=2048)
    p.add_argument("--max-memory", type=float, help="budget in GiB (default: the GPU's memory)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed generations first (graph captures, kernel loads); 0 at 8192, where one generation "
                        "takes minutes and the timed one then includes the captures")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test on tiny models (no memory figures)")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    runs = args.runs.split(",")
    if bad := [r for r in runs if r not in RUNS]:
        p.error(f"unknown run {bad[0]!r}; choose from {', '.join(RUNS)}")
    width, height = parse_size(args.size)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    limit = (int(args.max_memory * GiB) if args.max_memory else torch.cuda.get_device_properties(dev).total_memory
             if dev.type == "cuda" else 64 * GiB)
    if args.max_memory and dev.type == "cuda":  # as mf-generate: the allocator reserves no more than the budget
        from megafusion.cli.common import cap_device_memory

        cap_device_memory(args.max_memory, dev)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    bundle = load_model(args.model, random_weights=not args.model.startswith("tiny"), device=dev, dtype=dtype)
    vae_dtype = default_vae_dtype(bundle.family, bundle.vae.config, dtype, dev)

    rows, first = [], None
    base = _networks(bundle, args.mode, vae_dtype, dev)
    for name in runs:
        row, image = _one(bundle, base, name, _plan(bundle.family, name, width, height), args, dev, vae_dtype, limit)
        if image is not None:
            from PIL import Image

            Image.fromarray(image).resize((1024, round(1024 * height / width)), Image.LANCZOS).save(
                out / f"{name}_preview.png")
            if first is None:
                first = image
            else:
                row["difference"] = _difference(image, first)
        rows.append(row)
    result = {"model": args.model, "size": args.size, "mode": args.mode, "vae_dtype": str(vae_dtype),
              "budget_gib": limit / GiB, "rows": rows, "provenance": provenance(),
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    (out / "large_sizes.json").write_text(json.dumps(result, indent=2, default=str))
    table = f"# {args.model} {args.size}, mode {args.mode}, VAE {vae_dtype}\n\n" + _table(rows)
    (out / "large_sizes.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
