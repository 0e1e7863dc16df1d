"""LoRA swapped into built engines (engine/lora_swap.py): how long a swap takes, and whether the swapped engines
give the image the torch path gives with the LoRA fused (and, where built, engines built from the fused weights).

python3 benchmarks/lab/lora_swap.py --model tiny-sd15 --device cpu --stages 128x128:4,256x256:2 --output DIR  # CPU, 7 min
python3 benchmarks/lab/lora_swap.py --model sdxl --device cuda --engine-dir engines/sdxl-aoti --output DIR    # H200

On the H200 the SDXL build takes about 6 minutes and the measurement about 3: with `--build-only` first and
`--no-build` after, each run stays under the machine's 10 minutes a command; `--fused-engine-dir` adds a second
build (from the LoRA-fused weights) and its comparison.

1. A random LoRA in diffusers format (rank --rank, on the UNet's attention projections to_q, to_k, to_v, to_out.0),
   written to DIR/lora.safetensors from --lora-seed.
2. Static AOTInductor packages of the base weights for the default plan (`mf-build-engines --random-weights
   --backend aoti`, --jobs processes) in --engine-dir (default DIR/engines; entries already built are kept).
   With --fused-engine-dir, also packages built from the LoRA-fused weights (`mf-build-engines --lora`).
3. The base packages opened as mf-generate opens them; the base image; --repeats swaps of the LoRA in (each
   followed by a swap back out), median times; the image from the swapped packages.
4. The torch path with the LoRA fused (eager, the model's dtype on the device), the same prompt and seed: max
   and mean level difference of the images, and the LoRA's own effect (swapped against base) for scale.
Writes lora-swap-<model>.json and .md under --output.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megafusion.benchmarks.timing import provenance
from megafusion.core.loading import load_model
from megafusion.core.lora import LoraSpec, fuse_loras, fused_weights
from megafusion.core.plan import default_plan, parse_stages, validate_plan
from megafusion.engine.load import open_engines
from megafusion.engine.lora_swap import LoraSwap
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(bundle, path: Path, rank: int, std: float, seed: int) -> int:
    """A diffusers-format LoRA on every UNet attention projection: down ~ N(0, 1/in), up ~ N(0, std^2/r), so the
    update's entries have about std/sqrt(in) spread (random-init weights: about 0.58/sqrt(in)). Returns the layers."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in bundle.unet.named_modules():
        if name.endswith(TARGETS) and isinstance(m, torch.nn.Linear):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            state[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * std / rank ** 0.5
    save_file(state, str(path))
    return len(state) // 2


def build_command(args, folder: Path, lora: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "megafusion.cli.build_engines", "--model", args.model, "--backend", "aoti",
           "--precision", args.precision, "--device", args.device, "--jobs", str(args.jobs), "--output", str(folder)]
    if args.stages:
        cmd += ["--stages", args.stages]
    if not args.model.startswith("tiny-"):
        cmd.append("--random-weights")
    if lora:  # only the UNet takes the LoRA: the other networks are the base build's
        cmd += ["--lora", lora, "--networks", "unet"]
    return cmd


def build(args, folder: Path, lora: str | None) -> float:
    cmd = build_command(args, folder, lora)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def build_both(args, base: Path, fused: Path, lora: str) -> tuple[float, float]:
    """The base and the LoRA-fused packages built side by side (the cache's lock keeps a shared folder's
    manifest whole): the two builds are CPU-bound compiles, so together they take less than one after the other."""
    cmds = [build_command(args, base, None), build_command(args, fused, lora)]
    t0 = time.perf_counter()
    procs = []
    for cmd in cmds:
        print("$ " + " ".join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd))
    took = []
    for proc, cmd in zip(procs, cmds):
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        took.append(time.perf_counter() - t0)
    return took[0], took[1]


def levels(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(int) - b.astype(int))
    return {"max": int(d.max()), "mean": float(d.mean()), "over_2": float((d > 2).mean())}


def run(args) -> dict:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    lora_path = out / "lora.safetensors"
    lora_arg = f"{lora_path}:{args.scale:g}"
    report = {"model": args.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "precision": args.precision, "rank": args.rank, "scale": args.scale}
    bundle = load_model(args.model, random_weights=True)  # fp32 on the CPU, as mf-build-engines and mf-generate
    fam = bundle.family
    plan = validate_plan(fam, parse_stages(args.stages)) if args.stages else default_plan(fam)
    report["plan"] = plan.describe()
    report["lora_layers"] = write_lora(bundle, lora_path, args.rank, args.std, args.lora_seed)
    report["lora_mib"] = lora_path.stat().st_size / 2 ** 20
    engine_dir = Path(args.engine_dir or out / "engines")
    if not args.no_build:
        if args.fused_engine_dir:
            report["build_s"], report["fused_build_s"] = build_both(args, engine_dir, Path(args.fused_engine_dir),
                                                                    lora_arg)
        else:
            report["build_s"] = build(args, engine_dir, None)
    if args.build_only:
        print(json.dumps(report), flush=True)
        return report
    opts = GenerationOptions(args.prompt, "", 7.0, args.seed, True, 2, "pixel")
    spec = LoraSpec(lora_path, args.scale)

    t0 = time.perf_counter()
    nets, desc = open_engines(engine_dir, bundle, plan, device=dev, backend="aoti", precision=args.precision)
    report["open_s"] = time.perf_counter() - t0
    print(f"{desc}: opened in {report['open_s']:.1f} s", flush=True)
    pipe = MegaFusionPipeline(bundle, nets, dev)
    base_img = pipe.generate(plan, opts).image
    swap = LoraSwap(nets, bundle, "(lab)")
    t0 = time.perf_counter()
    fused_weights(bundle, [spec], dev)  # the part of a swap that computes the weights, alone
    sync(dev)
    report["fused_weights_s"] = time.perf_counter() - t0
    ins, outs = [], []
    for _ in range(args.repeats):
        r = swap.swap([spec])
        ins.append(r.seconds)
        outs.append(swap.swap([]).seconds)
    r = swap.swap([spec])
    report.update(swap_in_s=ins, swap_out_s=outs, swap_in_median_s=statistics.median(ins),
                  swap_out_median_s=statistics.median(outs), engines=r.engines, tensors=r.tensors)
    print(f"swap in: median {report['swap_in_median_s']:.3f} s of {ins}; out: {outs}; {r.engines} packages, "
          f"{r.tensors} tensors", flush=True)
    swapped_img = pipe.generate(plan, opts).image
    del pipe, nets, swap
    torch.cuda.empty_cache() if dev.type == "cuda" else None

    images = {"base_engines": base_img, "swapped_engines": swapped_img}
    if args.fused_engine_dir:
        fused_cpu = load_model(args.model, random_weights=True)
        fuse_loras(fused_cpu, [spec])
        fnets, _ = open_engines(Path(args.fused_engine_dir), fused_cpu, plan, device=dev, backend="aoti",
                                precision=args.precision)
        images["fused_engines"] = MegaFusionPipeline(fused_cpu, fnets, dev).generate(plan, opts).image
        del fnets, fused_cpu
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    del bundle
    torch_bundle = load_model(args.model, random_weights=True, device=dev, dtype=dtype)
    fuse_loras(torch_bundle, [spec])
    vae = torch.bfloat16 if dev.type == "cuda" and fam.is_xl and dtype == torch.float16 else dtype  # as the engines
    images["torch_fused"] = MegaFusionPipeline(torch_bundle, TorchNetworks(torch_bundle, vae), dev).generate(plan, opts).image
    report["swapped_vs_torch_fused"] = levels(images["swapped_engines"], images["torch_fused"])
    report["swapped_vs_base"] = levels(images["swapped_engines"], images["base_engines"])
    if "fused_engines" in images:
        report["swapped_vs_fused_engines"] = levels(images["swapped_engines"], images["fused_engines"])
    from PIL import Image

    for k, img in images.items():
        Image.fromarray(img).save(out / f"{k}.png")
    report = provenance() | report
    stem = out / f"lora-swap-{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return report


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def markdown(r: dict) -> str:
    rows = [f"# LoRA swap into built AOTInductor packages: {r['model']} on {r['device']}", "",
            f"Plan {r['plan']}, {r['precision']}; LoRA rank {r['rank']} on {r['lora_layers']} UNet attention "
            f"projections ({r['lora_mib']:.0f} MiB), scale {r['scale']:g}.", "",
            "| measure | value |", "|---|---|",
            f"| swap in, median of {len(r['swap_in_s'])} | {r['swap_in_median_s']:.3f} s |",
            f"| swap out (back to the base), median | {r['swap_out_median_s']:.3f} s |",
            f"| of which computing the fused weights | {r['fused_weights_s']:.3f} s |",
            f"| packages / tensors replaced | {r['engines']} / {r['tensors']} |",
            f"| open the base packages (fingerprints, load) | {r['open_s']:.1f} s |"]
    for key, what in (("swapped_vs_torch_fused", "swapped engines vs torch path with the LoRA fused"),
                      ("swapped_vs_fused_engines", "swapped engines vs engines built from the fused weights"),
                      ("swapped_vs_base", "swapped engines vs base engines (the LoRA's effect)")):
        if key in r:
            d = r[key]
            rows.append(f"| {what}: max / mean level difference, share > 2 | {d['max']} / {d['mean']:.3f}, "
                        f"{d['over_2']:.4f} |")
    if "build_s" in r:
        rows.append(f"| build of the base packages | {r['build_s']:.0f} s |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/lora_swap.py")
    p.add_argument("--model", default="sdxl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default=None, help="engine precision (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--std", type=float, default=0.05, help="spread of the LoRA's up matrices (see write_lora)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--lora-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the images")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    p.add_argument("--stages", help="plan as mf-generate's --stages (default: the model's default plan)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", type=int, default=3, help="mf-build-engines --jobs")
    p.add_argument("--engine-dir", help="base packages (built there unless --no-build; default OUTPUT/engines)")
    p.add_argument("--fused-engine-dir", help="also build packages from the LoRA-fused weights there and compare")
    p.add_argument("--no-build", action="store_true", help="use --engine-dir (and --fused-engine-dir) as they are")
    p.add_argument("--build-only", action="store_true",
                   help="write the LoRA and build the packages, measure nothing (a run per step keeps each under "
                        "the GPU machine's 10 minutes a command)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    args.precision = args.precision or ("fp16" if torch.device(args.device).type == "cuda" else "fp32")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
