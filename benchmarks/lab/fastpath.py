"""The eager runtime beside the graphed and compiled fast paths, one process, one GPU.

python benchmarks/lab/fastpath.py --model sdxl --modes eager,graphs,compiled --output DIR

Each mode runs the same plan, seed and prompt; prints per-stage times, per-step times, the graphed loop's
host enqueue time, peak memory and the image difference to the eager path; writes fastpath.json and
fastpath.md into DIR.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from megafusion.engine.networks import TorchNetworks
from megafusion.engine.torch_fast import INDUCTOR_SETS, FastOptions, FastTorchNetworks, inductor_set
from megafusion.core.loading import load_model
from megafusion.core.plan import default_plan, parse_size, parse_stages, validate_plan
from megafusion.runtime.graphs import GraphKey
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from megafusion.benchmarks.timing import provenance


def _pipeline(mode: str, bundle, vae_dtype):
    if mode == "eager":
        return MegaFusionPipeline(bundle, TorchNetworks(bundle, vae_dtype))
    if mode == "graphs":
        return MegaFusionPipeline.fast(bundle, TorchNetworks(bundle, vae_dtype))
    if mode == "compiled":  # mutates the modules (fused QKV, channels_last): run it last
        return MegaFusionPipeline.fast(bundle, FastTorchNetworks(bundle, FastOptions(), vae_dtype))
    if mode == "compiled-unet":
        return MegaFusionPipeline.fast(bundle, FastTorchNetworks(bundle, FastOptions(compile_vae=False), vae_dtype))
    if mode.startswith("compiled@"):  # compiled@<INDUCTOR_SETS name>; checked before the modules are touched
        opts = FastOptions(inductor_options=inductor_set(mode.partition("@")[2], f" in mode {mode!r}"))
        return MegaFusionPipeline.fast(bundle, FastTorchNetworks(bundle, opts, vae_dtype))
    if mode.startswith("compiled-"):  # compiled-<unet attention>-<vae attention>[-tuned]; this older "-tuned" is
        # the set `coord+1x1`, not the set named `tuned`
        parts = mode.split("-")
        opts = FastOptions(unet_attention=parts[1], vae_attention=parts[2],
                           inductor_options=INDUCTOR_SETS["coord+1x1"] if "tuned" in parts else ())
        return MegaFusionPipeline.fast(bundle, FastTorchNetworks(bundle, opts, vae_dtype))
    raise ValueError(f"unknown mode {mode!r}")


def run(args) -> dict:
    dev = torch.device("cuda")
    bundle = load_model(args.model, random_weights=True, device=dev, dtype=torch.float16)
    vae_dtype = torch.float16 if args.vae_dtype == "fp16" else torch.float32
    if args.stages:
        w, h = parse_size(args.size) if args.size else (None, None)
        plan = validate_plan(bundle.family, parse_stages(args.stages), w, h)
    else:
        w, h = parse_size(args.size) if args.size else (None, None)
        plan = default_plan(bundle.family, w, h)
    opts = GenerationOptions(args.prompt, seed=args.seed, relay=args.relay)
    report = {
        "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "model": args.model,
        "plan": plan.describe(), "vae_dtype": args.vae_dtype, "relay": args.relay, "modes": {},
    }
    print(f"{report['gpu']}  torch {torch.__version__}  plan {plan.describe()}", flush=True)
    ref_image = ref_latent = None
    for mode in args.modes.split(","):
        pipe = _pipeline(mode, bundle, vae_dtype)
        t0 = time.perf_counter()
        pipe.generate(plan, opts)  # warm-up: compile, capture, cuDNN autotune
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        runs = [pipe.generate(plan, opts) for _ in range(args.repeats)]
        totals = [sum(s for _, s in r.timings) for r in runs]
        med = statistics.median(totals)
        seg = {name: statistics.median(r.timings[i][1] for r in runs) for i, (name, _) in enumerate(runs[0].timings)}
        res = runs[-1]
        entry = {
            "total_s_median": med, "total_s_all": totals, "first_run_s": warm, "segments_s": seg,
            "per_step_ms": {name: 1000 * s / st.steps for (name, s), st in
                            zip([(n, v) for n, v in seg.items() if n.startswith("stage")], plan.stages)},
            "peak_memory_gib": res.peak_memory_bytes / 2**30,
        }
        if pipe.graphs is not None:
            entry["captures"], entry["replays"] = pipe.graphs.captures, pipe.graphs.replays
            # Host overhead of the graphed loop: stage time per step minus one replay's GPU time.
            per_key = {}
            stage_names = [n for n in seg if n.startswith("stage")]
            vs, batch = bundle.family.vae_scale, 2 if opts.guidance > 1 else 1
            for k, (name, st) in enumerate(zip(stage_names, plan.stages)):
                key = GraphKey(batch, st.height // vs, st.width // vs, 1 if k == 0 else opts.dilation)
                gpu_ms, launch_ms = pipe.graphs.replay_timing(key)
                step_ms = 1000 * seg[name] / st.steps
                per_key[name] = {"replay_gpu_ms": gpu_ms, "launch_host_ms": launch_ms, "step_wall_ms": step_ms,
                                 "overhead_ms_per_step": step_ms - gpu_ms}
            entry["graph_overhead"] = per_key
        if ref_image is None:
            ref_image, ref_latent = res.image, res.latent
        else:
            entry["max_abs_uint8_diff_vs_first"] = int(np.abs(res.image.astype(int) - ref_image.astype(int)).max())
            entry["mean_abs_uint8_diff_vs_first"] = float(np.abs(res.image.astype(int) - ref_image.astype(int)).mean())
            entry["latent_relerr_vs_first"] = float((res.latent - ref_latent).norm() / ref_latent.norm())
        report["modes"][mode] = entry
        for name, o in entry.get("graph_overhead", {}).items():
            print(f"    {name}: replay {o['replay_gpu_ms']:.2f} ms GPU, launch {o['launch_host_ms'] * 1000:.0f} us host, "
                  f"step {o['step_wall_ms']:.2f} ms wall, overhead {o['overhead_ms_per_step']:.3f} ms/step", flush=True)
        print(f"[{mode}] total {med * 1000:.1f} ms (first run {warm:.1f} s), peak {entry['peak_memory_gib']:.2f} GiB",
              flush=True)
        for name, s in seg.items():
            print(f"    {name:<40} {s * 1000:9.1f} ms", flush=True)
        del pipe
        torch.cuda.empty_cache()
    base = report["modes"].get("eager", {}).get("total_s_median")
    lines = ["| mode | total ms | speedup vs eager | peak GiB | per-step ms by stage | image diff (max/mean uint8) |",
             "|---|---|---|---|---|---|"]
    for mode, e in report["modes"].items():
        steps = ", ".join(f"{v:.1f}" for v in e["per_step_ms"].values())
        diff = f"{e.get('max_abs_uint8_diff_vs_first', 0)}/{e.get('mean_abs_uint8_diff_vs_first', 0):.2f}"
        sp = f"{base / e['total_s_median']:.2f}x" if base else "-"
        lines.append(f"| {mode} | {e['total_s_median'] * 1000:.1f} | {sp} | {e['peak_memory_gib']:.2f} | {steps} | {diff} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fastpath-{args.model}.json").write_text(json.dumps(provenance() | report, indent=2))
    (out / f"fastpath-{args.model}.md").write_text(f"# fast path, {report['gpu']}\n\n{report['plan']}\n\n{table}\n")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/fastpath.py")
    p.add_argument("--model", default="sdxl")
    p.add_argument("--size")
    p.add_argument("--stages")
    p.add_argument("--modes", default="eager,graphs,compiled")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a photo of a red fox in the snow, highly detailed")
    p.add_argument("--relay", default="pixel", choices=("pixel", "latent"))
    p.add_argument("--vae-dtype", default="fp16", choices=("fp16", "fp32"))
    p.add_argument("--output", default="fastpath-results")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
