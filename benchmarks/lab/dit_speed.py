"""SD3 / FLUX at 2048: MegaFusion against direct with the same total steps, eager against compiled, one GPU.

python benchmarks/lab/dit_speed.py --model sd3 --output DIR [--modes eager,graphs,compiled] [--repeats 2]

Random weights at the real sizes (nothing is downloaded). Every mode runs both plans with the same prompt and
seed: the family's default MegaFusion plan (1024 x20 -> 2048 x8) and a direct one-stage 2048 plan of the same
28 steps. `eager` is the flow stage loop on the torch modules, which are called as diffusers' pipelines call
them (so the same work a diffusers user's script does; `--diffusers` also times StableDiffusion3Pipeline /
FluxPipeline on the direct plan to check that); `graphs` replays one CUDA graph of the whole step per stage shape
(runtime/flow_graphs.py); `compiled` is graphs around the torch.compile'd transformer (the VAE halves too with
--compile-vae). These are the pipeline's own modes, `FlowMegaFusionPipeline(mode=...)`; `engines` is graphs
with the transformer from the AOTInductor packages in `--engines DIR` (mf-build-engines --random-weights
--backend aoti --precision DTYPE --device cuda, both plans' shapes). Prints, and writes after each mode,
dit_speed_<model>.json / .md: per-segment times (median of the repeats), the warm-up runs, totals, peak memory and
the two ratios of issue #17 (MegaFusion over direct on one engine; compiled over eager on one plan).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from megafusion.benchmarks.timing import provenance
from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, default_plan, validate_plan
from megafusion.engine.cache import atomic_write
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.runtime.flow_memory import estimate_flow_memory, meta_networks
from megafusion.runtime.flow_pipeline import FLOW_MODES, FlowGenerationOptions, FlowMegaFusionPipeline

def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROMPT = "a lighthouse on a rocky coast at dawn, highly detailed"


LAB_MODES = (*FLOW_MODES, "engines", "compiled-fp8")
"""Run order: compiled wraps the VAE halves in place, so it runs after eager and graphs; compiled-fp8 (compiled with
the transformer blocks' image-stream projections as FP8 GEMMs, engine/fp8_dit.py; bf16 only) quantizes the
transformer in place, so it runs last."""


def networks(bundle, mode: str, compile_vae: bool, engines: str | None = None, dtype: str = "") -> FlowTorchNetworks:
    if mode == "engines":
        from megafusion.engine.dit_engines import engine_networks

        return engine_networks(bundle, engines, bundle.transformer.device, dtype)
    if mode == "compiled-fp8":
        from megafusion.engine.fp8_dit import quantize_transformer

        print(f"compiled-fp8: {len(quantize_transformer(bundle.transformer))} projections as FP8", flush=True)
    nets = FlowTorchNetworks(bundle, compiled=mode.startswith("compiled"))
    if mode.startswith("compiled") and compile_vae:
        vae = bundle.vae
        vae.decoder = torch.compile(vae.decoder, dynamic=False)
        vae.encoder = torch.compile(vae.encoder, dynamic=False)
    return nets


def run(pipe, plan, opts, repeats: int, warmup: int) -> dict:
    first = []  # the warm-up runs: compiled mode's include its compiling
    for _ in range(warmup):
        _sync()
        t0 = time.perf_counter()
        pipe.generate(plan, opts)
        _sync()
        first.append(time.perf_counter() - t0)
    runs = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        res = pipe.generate(plan, opts)
        runs.append((time.perf_counter() - t0, res))
    totals = [t for t, _ in runs]
    segs = {}
    for name, _ in runs[0][1].timings:
        segs[name] = statistics.median(dict(r.timings)[name] for _, r in runs)
    last = runs[-1][1]
    return {"plan": plan.describe(), "total_s": statistics.median(totals), "totals_s": totals, "warmup_s": first,
            "segments_s": segs,
            "peak_gib": last.peak_memory_bytes / 2**30 if last.peak_memory_bytes else None,
            "image_mean": float(last.image.mean()), "finite": bool(torch.isfinite(last.latent).all())}


def diffusers_direct(bundle, plan, opts, repeats: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    sched = FlowMatchEulerDiscreteScheduler(**bundle.family.scheduler)
    te, tok = bundle.text_encoders, bundle.tokenizers
    if bundle.family.kind == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=bundle.transformer, scheduler=sched, vae=bundle.vae,
                                        text_encoder=te[0], tokenizer=tok[0], text_encoder_2=te[1],
                                        tokenizer_2=tok[1], text_encoder_3=te[2], tokenizer_3=tok[2])
    else:
        pipe = FluxPipeline(transformer=bundle.transformer, scheduler=sched, vae=bundle.vae, text_encoder=te[0],
                            tokenizer=tok[0], text_encoder_2=te[1], tokenizer_2=tok[1])
    pipe.set_progress_bar_config(disable=True)
    st = plan.stages[0]
    times = []
    for i in range(repeats + 1):  # the first call warms up
        _sync()
        t0 = time.perf_counter()
        pipe(opts.prompt, height=st.height, width=st.width, num_inference_steps=st.steps,
             guidance_scale=opts.guidance, generator=torch.Generator("cpu").manual_seed(opts.seed))
        _sync()
        if i:
            times.append(time.perf_counter() - t0)
    return {"plan": plan.describe(), "total_s": statistics.median(times), "totals_s": times}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd3", choices=("sd3", "flux", "tiny-sd3", "tiny-flux"))
    p.add_argument("--modes", default="eager,graphs,compiled")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile-vae", action="store_true", help="compiled mode also compiles the VAE halves "
                   "(minutes more compiling; the VAE is a few percent of a DiT plan's time)")
    p.add_argument("--diffusers", action="store_true", help="also time the diffusers pipeline on the direct plan")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with a tiny model)")
    p.add_argument("--engines", metavar="DIR", help="with --modes engines: the AOTInductor transformer packages")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in LAB_MODES]
    if bad:
        p.error(f"--modes: unknown mode {bad[0]!r}; choose from {', '.join(LAB_MODES)}")
    if "compiled-fp8" in modes and args.device != "cpu" and args.dtype != "bf16":
        p.error(f"--modes compiled-fp8 with --dtype {args.dtype}: FP8 GEMMs write bf16 on CUDA; use --dtype bf16")
    if ("engines" in modes) != (args.engines is not None):
        p.error("--modes engines and --engines DIR go together")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    bundle = load_model(args.model, random_weights=True, device=dev, dtype=DTYPES[args.dtype])
    fam = bundle.family
    print(f"{fam.name} random weights on {device_name} in {args.dtype}: "
          f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    mf = default_plan(fam)
    direct = validate_plan(fam, [Stage(mf.stages[-1].height, mf.stages[-1].width, mf.total_steps)])
    opts = FlowGenerationOptions(PROMPT, guidance=fam.default_guidance, seed=0)
    result: dict = {"model": fam.name, "dtype": args.dtype, "device": device_name,
                    "torch": torch.__version__, "guidance": opts.guidance, "provenance": provenance(), "modes": {}}
    # runtime/flow_memory.py's estimate of each plan run eagerly, beside the peaks measured below
    meta = meta_networks(fam, DTYPES[args.dtype])
    result["estimate_gib"] = {k: estimate_flow_memory(fam, plan, DTYPES[args.dtype], None, opts.guidance > 1.0,
                                                      networks=meta).peak_bytes / 2**30
                              for k, plan in (("megafusion", mf), ("direct", direct))}
    if args.diffusers:
        result["diffusers_direct"] = diffusers_direct(bundle, direct, opts, args.repeats)
        print(f"diffusers direct: {result['diffusers_direct']['total_s']:.2f} s", flush=True)
    for mode in sorted(modes, key=LAB_MODES.index):
        nets = networks(bundle, mode, args.compile_vae, args.engines, args.dtype)
        pipe_mode = {"engines": "graphs", "compiled-fp8": "compiled"}.get(mode, mode)
        pipe = FlowMegaFusionPipeline(bundle, nets, dev, pipe_mode)
        r = {name: run(pipe, plan, opts, args.repeats, args.warmup) for name, plan in (("megafusion", mf),
                                                                                     ("direct", direct))}
        r["megafusion_speedup"] = r["direct"]["total_s"] / r["megafusion"]["total_s"]
        if pipe.graphs is not None:
            r["graph_captures"], r["graph_replays"] = pipe.graphs.captures, pipe.graphs.replays
        result["modes"][mode] = r
        print(f"{mode}: megafusion {r['megafusion']['total_s']:.2f} s, direct {r['direct']['total_s']:.2f} s, "
              f"{r['megafusion_speedup']:.2f}x; peak {r['megafusion']['peak_gib'] or 0:.1f} / "
              f"{r['direct']['peak_gib'] or 0:.1f} GiB", flush=True)
        write(result, direct, out, quiet=True)  # a step cut off by its time limit keeps the modes it ran
    print("\n".join(write(result, direct, out)))
    return 0


def write(result: dict, direct, out: Path, quiet: bool = False) -> list[str]:
    m = result["modes"]
    for fast in ("graphs", "compiled", "engines", "compiled-fp8"):
        if "eager" in m and fast in m:  # speed-up of the mode over eager, on each plan
            result[f"{fast}_over_eager"] = {k: m["eager"][k]["total_s"] / m[fast][k]["total_s"]
                                            for k in ("megafusion", "direct")}
            if not quiet:
                print(f"{fast} over eager: {result[f'{fast}_over_eager']}", flush=True)
        if "diffusers_direct" in result and fast in m:  # our mode on MegaFusion against a diffusers user's run
            result[f"{fast}_megafusion_over_diffusers_direct"] = (result["diffusers_direct"]["total_s"]
                                                                  / m[fast]["megafusion"]["total_s"])
    name = result["model"]
    # whole or not at all: a limit's kill mid-write leaves the previous mode's files
    atomic_write(out / f"dit_speed_{name}.json", json.dumps(result, indent=1).encode())
    prov = result["provenance"]
    lines = [f"# {name} at {direct.stages[0].width}, {result['dtype']}, {result['device']}", "",
             f"Commit {prov['commit']}{' (dirty)' if prov['dirty'] else ''}, {prov['date_utc']}: "
             f"`{prov['command']}`", "",
             "| mode | plan | total s | peak GiB | estimate GiB (eager) |", "|---|---|---|---|---|"]
    est = result.get("estimate_gib", {})
    for mode, r in m.items():
        for k in ("megafusion", "direct"):
            lines.append(f"| {mode} | {r[k]['plan']} | {r[k]['total_s']:.2f} | {r[k]['peak_gib'] or 0:.1f} | "
                         f"{est.get(k, 0):.1f} |")
    atomic_write(out / f"dit_speed_{name}.md", ("\n".join(lines) + "\n").encode())
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
