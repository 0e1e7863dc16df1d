"""FP8 UNet projections (engine/fp8.py) against fp16, bf16 and fp32 on one GPU, random weights, default plans.

python3 benchmarks/lab/fp8_unet.py --model sdxl --output DIR [--parts accuracy,graphs,compiled] [--budget-s 540]

Parts, in this order, each written to DIR/fp8-<model>.json (and a Markdown table, and each variant's image as
PNG) as soon as it ends:
- accuracy: per stage (its shape and mid dilation), eps of the fp16, bf16 and FP8 UNets against fp32 and against
  fp16, relative L2, at a few timesteps; the conditioning is the fp32 text encoders' for the prompt (CFG batch);
- graphs: the whole plan through the CUDA-graphed loop (eager modules) with the fp16, bf16 and FP8 UNets: median
  time, GPU time of one graphed step per stage shape (UNet at the CFG batch + DDIM update), the image's
  difference to fp16's (uint8 levels, PSNR) and the final latent's relative L2;
- compiled: the compiled path (torch.compile fullgraph, default mode) with fp16 and FP8 (`--compiled`): first generation
  (compile + capture) time, median, per-stage step time, image difference. `fp8s` is FP8 with static activation
  scales (engine/fp8.py `calibrate_input_scales`), calibrated eagerly at every stage shape on another prompt, seed
  and timesteps (CALIBRATION) before the compile; the accuracy part then measures it too. A compiled variant whose
  turn comes when less than --compile-reserve-s is left of --budget-s is skipped and recorded as such.
`--compile-vae` compiles the VAE too (the mf-generate compiled path); off by default, to leave the time to the
UNet compiles (the VAE is the same eager module for every variant, so the comparison is the UNet's).
On the CPU (tiny models), only `accuracy` runs: the smoke test of tests/lab.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megafusion.benchmarks.timing import provenance
from megafusion.core.loading import load_model
from megafusion.core.plan import default_plan
from megafusion.core.specs import default_vae_dtype
from megafusion.engine.fp8 import ROLES, Fp8Linear, Fp8Policy, fp8_unavailable, quantize_unet
from megafusion.engine.fp8_scales import Fp8Calibration
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.conditioning import encode
from megafusion.runtime.fp8_calibration import calibrate_for_plan
from megafusion.runtime.graphs import GraphKey
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

PARTS = ("accuracy", "graphs", "compiled")
TIMESTEPS = (999, 601, 201, 21)
"""Where eps is compared: early (pure noise) to late steps."""
RECIPE = Fp8Calibration()
CALIBRATION = dataclasses.asdict(RECIPE)
"""Where static FP8 scales are calibrated (mf-generate --fp8-scales static's recipe): not the measured prompt, seed
or timesteps."""


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def image_diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    mse = float((d.astype(np.float64) ** 2).mean())
    return {"max_abs_uint8": int(d.max()), "mean_abs_uint8": float(d.mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}


def make_unets(unet32: torch.nn.Module, policy: Fp8Policy) -> dict[str, torch.nn.Module]:
    """fp16, bf16 and FP8 (bf16 around the FP8 projections) copies of one fp32 UNet: the same weights."""
    # nn.Module.to: diffusers' own .to warns about modules to keep in fp32 (SD UNets have none)
    u16 = torch.nn.Module.to(copy.deepcopy(unet32), dtype=torch.float16)
    ubf = torch.nn.Module.to(copy.deepcopy(unet32), dtype=torch.bfloat16)
    u8 = copy.deepcopy(ubf)
    quantize_unet(u8, policy)
    return {"fp16": u16, "bf16": ubf, "fp8": u8}


def calibrate(bundle, unet: torch.nn.Module, plan, dev, dilation: int) -> dict:
    """Static input scales for `unet`'s FP8 layers from eager runs at every stage shape (the runtime's recipe)."""
    t0 = time.perf_counter()
    scales = calibrate_for_plan(dataclasses.replace(bundle, unet=unet), plan, dilation, True, dev, RECIPE)
    return {"layers": len(scales), "seconds": time.perf_counter() - t0, **CALIBRATION,
            "scale_range": [min(scales.values()), max(scales.values())]}


def accuracy(bundle, unets: dict, plan, dev, prompt: str, dilation: int, timesteps=TIMESTEPS) -> list[dict]:
    nets = {name: TorchNetworks(dataclasses.replace(bundle, unet=u)) for name, u in unets.items()}
    cond = encode(nets["fp32"], bundle, prompt, "", 7.0, dev)
    vs, rows = bundle.family.vae_scale, []
    for k, st in enumerate(plan.stages):
        d = 1 if k == 0 else dilation
        g = torch.Generator("cpu").manual_seed(k)
        x = torch.randn(cond.batch, 4, st.height // vs, st.width // vs, generator=g).to(dev)
        per_t = []
        for t in timesteps:
            tt = torch.tensor(t, device=dev)
            eps = {n: net.unet(x, tt, cond.hidden_states, cond.pooled, cond.time_ids(st.height, st.width), d)
                   for n, net in nets.items()}
            lowp = [n for n in ("fp16", "bf16", "fp8", "fp8s") if n in eps]
            per_t.append({"timestep": t, **{f"{n}_vs_fp32": relerr(eps[n], eps["fp32"]) for n in lowp},
                          **{f"{n}_vs_fp16": relerr(eps[n], eps["fp16"]) for n in lowp if n != "fp16"},
                          "fp8_vs_bf16": relerr(eps["fp8"], eps["bf16"])})
        keys = [k_ for k_ in per_t[0] if k_ != "timestep"]
        rows.append({"stage": k, "size": f"{st.width}x{st.height}", "dilation": d, "per_timestep": per_t,
                     "max": {k_: max(r[k_] for r in per_t) for k_ in keys}})
        static = f", static {rows[-1]['max']['fp8s_vs_fp16']:.4f}" if "fp8s" in eps else ""
        print(f"  stage {k} {st.width}x{st.height} d{d}: eps rel L2 fp8 vs fp16 max "
              f"{rows[-1]['max']['fp8_vs_fp16']:.4f}{static} (bf16 vs fp16 {rows[-1]['max']['bf16_vs_fp16']:.4f}, "
              f"fp16 vs fp32 {rows[-1]['max']['fp16_vs_fp32']:.4f})", flush=True)
    return rows


def run_pipeline(name: str, pipe: MegaFusionPipeline, plan, opts, repeats: int, ref: dict | None) -> dict:
    dev = pipe.device
    t0 = time.perf_counter()
    first = pipe.generate(plan, opts)  # compile (if compiled), capture, cuDNN autotune
    torch.cuda.synchronize(dev)
    first_s = time.perf_counter() - t0
    runs = [pipe.generate(plan, opts) for _ in range(repeats)]
    totals = [sum(s for _, s in r.timings) for r in runs]
    seg = {n: statistics.median(r.timings[i][1] for r in runs) for i, (n, _) in enumerate(runs[0].timings)}
    stage_names = [n for n in seg if n.startswith("stage")]
    vs, batch = pipe.family.vae_scale, 2 if opts.guidance > 1 else 1
    step_gpu = {}
    for k, (sn, st) in enumerate(zip(stage_names, plan.stages)):
        key = GraphKey(batch, st.height // vs, st.width // vs, 1 if k == 0 else opts.dilation)
        step_gpu[f"{st.width}x{st.height}"] = pipe.graphs.replay_timing(key)[0]
    res = runs[-1]
    entry = {"variant": name, "first_generation_s": first_s, "total_s_median": statistics.median(totals),
             "total_s_all": totals, "segments_s": seg, "step_gpu_ms": step_gpu,
             "peak_memory_gib": res.peak_memory_bytes / 2 ** 30, "image": res.image, "latent": res.latent}
    if ref is not None:
        _compare(entry, ref)
    del first
    steps = ", ".join(f"{s}: {ms:.2f} ms" for s, ms in step_gpu.items())
    print(f"  [{name}] median {entry['total_s_median'] * 1000:.1f} ms, first {first_s:.1f} s, step GPU {steps}"
          + (f", image vs fp16 mean {entry['image_vs_fp16']['mean_abs_uint8']:.2f} levels" if ref else ""), flush=True)
    return entry


def _compare(entry: dict, ref: dict) -> None:
    """The image and final latent of `entry` against the fp16 run `ref`."""
    entry["image_vs_fp16"] = image_diff(entry["image"], ref["image"])
    entry["latent_relerr_vs_fp16"] = relerr(entry["latent"].float(), ref["latent"].float())


def save_image(entry: dict, out: Path) -> None:
    """The variant's image as PNG beside the report (e.g. `compiled-fp8.png`), for a look with real weights."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(entry["image"]).save(out / f"{entry['variant'].replace(' ', '-')}.png")


def _public(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("image", "latent")}


def table(report: dict) -> str:
    lines = [f"# FP8 UNet projections, {report['gpu']}, {report['model']}", "", f"plan {report['plan']}; "
             f"{report['fp8_layers']} projections in FP8; torch {report['torch']}", ""]
    if report.get("accuracy"):
        lines += ["| stage | size | dilation | eps rel L2 fp8 vs fp16 (max over t) | fp8 static scales vs fp16 | "
                  "bf16 vs fp16 | fp16 vs fp32 | fp8 vs fp32 |", "|---|---|---|---|---|---|---|---|"]
        for r in report["accuracy"]:
            m = r["max"]
            st = f"{m['fp8s_vs_fp16']:.4f}" if "fp8s_vs_fp16" in m else "-"
            lines.append(f"| {r['stage']} | {r['size']} | {r['dilation']} | {m['fp8_vs_fp16']:.4f} | {st} | "
                         f"{m['bf16_vs_fp16']:.4f} | {m['fp16_vs_fp32']:.4f} | {m['fp8_vs_fp32']:.4f} |")
        lines.append("")
    rows = [e for part in ("graphs", "compiled") for e in report.get(part, [])]
    if rows:
        lines += ["| variant | whole plan median ms | first generation s | step GPU ms per stage | image vs fp16 "
                  "(max/mean levels, PSNR dB) | latent rel L2 vs fp16 |", "|---|---|---|---|---|---|"]
        for e in rows:
            if "skipped" in e:
                lines.append(f"| {e['variant']} | skipped: {e['skipped']} | | | | |")
                continue
            steps = ", ".join(f"{s} {ms:.2f}" for s, ms in e["step_gpu_ms"].items())
            im = e.get("image_vs_fp16")
            imd = f"{im['max_abs_uint8']}/{im['mean_abs_uint8']:.2f}, {im['psnr_db']:.1f}" if im else "-"
            lat = f"{e['latent_relerr_vs_fp16']:.4f}" if "latent_relerr_vs_fp16" in e else "-"
            lines.append(f"| {e['variant']} | {e['total_s_median'] * 1000:.1f} | {e['first_generation_s']:.1f} | "
                         f"{steps} | {imd} | {lat} |")
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    public = {k: [_public(e) for e in v] if k in ("graphs", "compiled") else v for k, v in report.items()}
    (out / f"fp8-{report['model']}.json").write_text(json.dumps(provenance() | public, indent=1))
    (out / f"fp8-{report['model']}.md").write_text(table(report))


def check_device(dev: torch.device, parts: list[str]) -> None:
    if dev.type == "cuda" and fp8_unavailable(dev):
        raise SystemExit(f"fp8_unet.py: {fp8_unavailable(dev)}")
    if dev.type != "cuda" and set(parts) - {"accuracy"}:
        raise SystemExit(f"fp8_unet.py: --parts {','.join(parts)}: only accuracy runs on {dev}")


def run(args) -> dict:
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    check_device(dev, parts)
    roles = tuple(r.strip() for r in args.roles.split(",") if r.strip()) if args.roles else Fp8Policy().roles
    policy = Fp8Policy(roles=roles, fast_accum=not args.no_fast_accum)
    bundle = load_model(args.model, args.model_path, random_weights=args.model_path is None, device=dev,
                        dtype=torch.float32, seed=args.weights_seed)
    plan = default_plan(bundle.family)
    unets = make_unets(bundle.unet, policy)
    report = {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "model": args.model, "weights": bundle.source, "plan": plan.describe(), "policy": repr(policy),
              "fp8_layers": sum(isinstance(m, Fp8Linear) for m in unets["fp8"].modules()),
              "prompt": args.prompt, "seed": args.seed, "load_s": time.perf_counter() - t_start}
    print(f"{report['gpu']}  torch {torch.__version__}  {args.model} plan {plan.describe()}  "
          f"{report['fp8_layers']} FP8 projections", flush=True)
    out = Path(args.output)
    if "accuracy" in parts:
        timesteps = tuple(int(t) for t in args.timesteps.split(","))
        measured = {"fp32": bundle.unet, **unets}
        if "fp8s" in args.compiled.split(","):
            measured["fp8s"] = copy.deepcopy(unets["fp8"])
            report["static_calibration_accuracy"] = calibrate(bundle, measured["fp8s"], plan, dev, 2)
        report["accuracy"] = accuracy(bundle, measured, plan, dev, args.prompt, 2, timesteps)
        del measured  # it holds the fp32 UNet, which `bundle.unet = None` below is meant to free
        save(report, out)
    bundle.unet = None  # the fp32 UNet is no longer needed
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for enc in bundle.text_encoders:  # shared by every variant, at the tools' CUDA default
        enc.to(dtype=torch.float16)
    vae = default_vae_dtype(bundle.family, bundle.vae.config, torch.float16, dev)
    opts = GenerationOptions(args.prompt, seed=args.seed)
    ref = None
    if "graphs" in parts:
        report["graphs"] = []
        for name in ("fp16", "bf16", "fp8"):
            b = dataclasses.replace(bundle, unet=unets[name])
            pipe = MegaFusionPipeline.fast(b, TorchNetworks(b, vae), dev)
            e = run_pipeline(f"graphs {name}", pipe, plan, opts, args.repeats, ref)
            save_image(e, out)
            ref = ref or e  # fp16 runs first
            report["graphs"].append(_public(e))
            del pipe
            torch.cuda.empty_cache()
            save(report, out)
    if "compiled" in parts:
        from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks

        report["compiled"] = []
        # The graphed modules are modified in place now (fused QKV, channels_last): compiled runs come last.
        variants = {"fp16": (unets["fp16"], None), "fp8": (unets["bf16"], policy), "fp8s": (None, policy)}
        for name in args.compiled.split(","):
            unet, fp8 = variants[name]
            if name == "fp8s":  # its own bf16 copy: "fp8" quantizes unets["bf16"] in place
                unet = copy.deepcopy(unets["bf16"]) if "fp8" in args.compiled.split(",") else unets["bf16"]
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < args.compile_reserve_s:
                report["compiled"].append({"variant": f"compiled {name}", "skipped":
                                           f"{left:.0f} s of --budget-s left, < --compile-reserve-s"})
                print(f"  [compiled {name}] skipped: {left:.0f} s left", flush=True)
                save(report, out)
                continue
            torch._dynamo.reset()
            b = dataclasses.replace(bundle, unet=unet)
            fast = FastOptions(compile_vae=args.compile_vae, unet_fp8=fp8)
            pipe = MegaFusionPipeline.fast(b, FastTorchNetworks(b, fast, vae), dev)
            if name == "fp8s":  # eager, on the prepared and quantized module, before its compile
                report["static_calibration"] = calibrate(bundle, unet, plan, dev, 2)
                print(f"  [compiled fp8s] {report['static_calibration']['layers']} static scales calibrated in "
                      f"{report['static_calibration']['seconds']:.1f} s", flush=True)
            e = run_pipeline(f"compiled {name}", pipe, plan, opts, args.repeats, ref)
            save_image(e, out)
            if ref is None and name == "fp16":  # no graphed fp16 image: the compiled one is the reference
                ref = e
                for done in report["compiled"]:  # an fp8 run before it gets its difference now
                    if "image" in done:
                        _compare(done, ref)
            report["compiled"].append(e)
            del pipe
            torch.cuda.empty_cache()
            save(report, out)
    report["wall_s"] = time.perf_counter() - t_start
    save(report, out)
    print(table(report))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/fp8_unet.py")
    p.add_argument("--model", default="sdxl", help="sdxl, sd15 (random weights), or a tiny model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-seed", type=int, default=0)
    p.add_argument("--model-path", help="a local diffusers folder (real weights) instead of random weights")
    p.add_argument("--prompt", default="a photo of a lighthouse on a cliff at dusk, highly detailed")
    p.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)), help="where eps is compared (default: %(default)s)")
    p.add_argument("--compiled", default="fp16,fp8",
                   help="compiled variants, in the order they run (default: %(default)s): fp16, fp8 (per-token "
                        "activation scales), fp8s (static scales); fp8 first when the budget may not hold both")
    p.add_argument("--compile-vae", action="store_true", help="compile the VAE too (more compile time)")
    p.add_argument("--roles", help="layer roles in FP8, comma-separated (default: Fp8Policy's; "
                                   "benchmarks/lab/fp8_roles.py measures each role's share of the error)")
    p.add_argument("--no-fast-accum", action="store_true", help="_scaled_mm without Hopper's fast accumulation")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the run (default: %(default)s)")
    p.add_argument("--compile-reserve-s", type=float, default=240.0,
                   help="a compiled variant starts only with this much of the budget left (default: %(default)s)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    unknown = [x for x in args.parts.split(",") if x.strip() and x.strip() not in PARTS]
    if unknown:
        p.error(f"--parts {args.parts}: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    bad_roles = [r for r in (args.roles or "").split(",") if r.strip() and r.strip() not in ROLES]
    if bad_roles or (args.roles is not None and not args.roles.strip()):
        p.error(f"--roles {args.roles}: unknown role(s) {', '.join(bad_roles) or '(none given)'}; "
                f"choose from {', '.join(ROLES)}")
    bad = [x for x in args.compiled.split(",") if x not in ("fp16", "fp8", "fp8s")]
    if bad or not args.compiled:
        p.error(f"--compiled {args.compiled}: give fp16, fp8 (per-token activation scales), fp8s (static ones) or "
                "several, comma-separated")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
