"""Does a lower precision change what the model draws? #20's real-weight check, runnable wherever weights exist.

python3 benchmarks/lab/precision_quality.py --model sdxl --model-path DIR --clip DIR --output OUT
    [--variants fp16,bf16,fp8,fp8-static] [--prompts FILE] [--count N] [--size WxH] [--steps S] [--device cuda]

Every variant draws the same N prompts with the same seeds and plan (the prompts file: one per line, cycled; the
built-in list otherwise). The first variant is the reference. Per variant: CLIP score (mean, and its change from the
reference), the Fréchet distance of its image set from the reference's in CLIP feature space (FD-CLIP), and the
paired pixel differences. The bf16 row is the noise floor: two 16-bit formats whose difference nobody calls a loss,
so FP8 passes where its changes stay within a small multiple of bf16's (docs/ENGINES.md, "FP8 with real weights").
On random weights (tiny models on the CPU, as tests/lab does) the numbers only show that the plumbing runs.

Variants run in this order whatever the order given (each changes the shared UNet in place): fp32, fp16, bf16 (the
UNet cast), fp8 (bf16 UNet, FP8 projections, per-token scales), fp8-static (the same layers, scales calibrated on
the plan with the runtime's recipe). The VAE and text encoders keep the model's precision throughout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megafusion.benchmarks.quality import ClipJudge, frechet_distance, paired_differences, scores_of
from megafusion.benchmarks.timing import provenance
from megafusion.core.loading import load_model, resolve_family
from megafusion.core.plan import PlanError, default_plan, parse_size, parse_stages, validate_plan
from megafusion.engine.fp8 import Fp8Linear, Fp8Policy, fp8_unavailable, quantize_unet
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.fp8_calibration import calibrate_for_plan
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

ORDER = ("fp32", "fp16", "bf16", "fp8", "fp8-static")
PROMPTS = ("a lighthouse on a cliff at dusk, waves below", "a bowl of ramen on a wooden table, steam rising",
           "portrait of an old fisherman, weathered face, soft light", "a red vintage car parked on a cobbled street",
           "a snowy mountain village at night, warm windows", "a hummingbird drinking from a purple flower",
           "an astronaut reading a newspaper on a park bench", "a watercolor map of an imaginary island")
"""Built-in prompts (cycled): subjects with fine detail, faces, text-free scenes."""
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The UNet's dtype per variant; the FP8 variants hold a bf16 UNet around their FP8 layers."""


def _variant_nets(name: str, bundle, plan, dilation: int, device) -> TorchNetworks:
    """The UNet set up for `name` (in place; ORDER says why the order is fixed)."""
    unet = bundle.unet
    torch.nn.Module.to(unet, dtype=DTYPES.get(name, torch.bfloat16))
    if name not in DTYPES:
        layers = [m for m in unet.modules() if isinstance(m, Fp8Linear)]
        if not layers:
            quantize_unet(unet, Fp8Policy())
            layers = [m for m in unet.modules() if isinstance(m, Fp8Linear)]
        if name == "fp8":
            for m in layers:
                m.input_scale = None
        else:
            calibrate_for_plan(bundle, plan, dilation, True, device)
    return TorchNetworks(bundle)


def run_variants(bundle, plan, opts: list[GenerationOptions], variants: list[str], device) -> dict[str, dict]:
    out = {}
    for name in [v for v in ORDER if v in variants]:
        nets = _variant_nets(name, bundle, plan, opts[0].dilation, device)
        pipe = (MegaFusionPipeline.fast(bundle, nets, device) if torch.device(device).type == "cuda"
                else MegaFusionPipeline(bundle, nets, device))
        t0 = time.perf_counter()
        images = [pipe.generate(plan, o).image for o in opts]
        out[name] = {"images": images, "seconds": time.perf_counter() - t0}
        print(f"  {name}: {len(images)} images in {out[name]['seconds']:.1f} s", flush=True)
    return out


def report(runs: dict[str, dict], prompts: list[str], judge: ClipJudge) -> list[dict]:
    names = list(runs)
    ref = names[0]
    feats = {n: judge.image_features(r["images"]) for n, r in runs.items()}
    text = judge.text_features(prompts)
    scores = {n: scores_of(f, text) for n, f in feats.items()}
    rows = []
    for n in names:
        row = {"variant": n, "images": len(scores[n]), "clip_score": statistics.fmean(scores[n]),
               "clip_score_sd": statistics.pstdev(scores[n]), "seconds": runs[n]["seconds"]}
        if n != ref:
            row["clip_score_change"] = row["clip_score"] - statistics.fmean(scores[ref])
            row["fd_clip_to_reference"] = frechet_distance(feats[n], feats[ref])
            row["paired"] = paired_differences(runs[n]["images"], runs[ref]["images"])
        rows.append(row)
    return rows


def table(rows: list[dict], ref: str) -> str:
    lines = [f"| variant | CLIP score | change from {ref} | FD-CLIP to {ref} | pixels max / mean | PSNR dB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r.get("paired")
        pixels = f"{p['max_levels']} / {p['mean_levels']:.2f}" if p else "-"
        psnr = f"{p['psnr_db']:.1f}" if p else "-"
        lines.append(f"| {r['variant']} | {r['clip_score']:.3f} | {r.get('clip_score_change', 0.0):+.3f} | "
                     f"{r.get('fd_clip_to_reference', 0.0):.4g} | {pixels} | {psnr} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/precision_quality.py")
    p.add_argument("--model", default="sdxl")
    p.add_argument("--model-path", help="a local diffusers folder (the real-weight check); without it, random weights")
    p.add_argument("--clip", required=True, help="a local CLIP model folder (transformers CLIPModel and tokenizer)")
    p.add_argument("--variants", default="fp16,bf16,fp8,fp8-static", help=f"from {', '.join(ORDER)}; first: reference")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--count", type=int, default=8, help="images per variant (FD needs hundreds to be stable)")
    p.add_argument("--size", help="output WxH (default: the model's 2x)")
    p.add_argument("--stages", help="an explicit plan instead of --size's default")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ORDER]
    if bad or len(variants) < 2:
        p.error(f"--variants {args.variants}: {'unknown ' + ', '.join(bad) if bad else 'name at least two'}; "
                f"choose from {', '.join(ORDER)}")
    if variants[0] != [v for v in ORDER if v in variants][0]:
        p.error(f"--variants {args.variants}: the reference (first) must come first in the order {', '.join(ORDER)}")
    device = torch.device(args.device)
    if any(v.startswith("fp8") for v in variants) and device.type == "cuda" and fp8_unavailable(device):
        p.error(fp8_unavailable(device))
    if args.count < 2:
        p.error(f"--count {args.count}: at least 2 (a covariance needs two images)")
    try:
        prompts = ([ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()] if args.prompts
                   else list(PROMPTS))
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"--prompts {args.prompts}: cannot be read ({e.__class__.__name__})")
    if not prompts:
        p.error(f"--prompts {args.prompts}: no prompt in the file")
    prompts = [prompts[i % len(prompts)] for i in range(args.count)]
    fam = resolve_family(args.model, args.model_path)
    try:  # before anything loads: a bad plan costs nothing
        plan = (validate_plan(fam, parse_stages(args.stages)) if args.stages
                else default_plan(fam, *(parse_size(args.size) if args.size else (None, None))))
    except PlanError as e:
        p.error(str(e))
    try:  # before the model: a bad folder costs no generation
        judge = ClipJudge(args.clip, device)
    except (OSError, ValueError) as e:
        p.error(f"--clip {args.clip}: not a CLIP model folder with its tokenizer ({str(e).splitlines()[0]})")
    bundle = load_model(args.model, args.model_path, random_weights=args.model_path is None, device=device,
                        dtype=DTYPES[variants[0]] if variants[0] in DTYPES else torch.float32)
    opts = [GenerationOptions(pr, seed=args.seed + i) for i, pr in enumerate(prompts)]
    print(f"plan {plan.describe()}, {len(opts)} images per variant, reference {variants[0]}", flush=True)
    runs = run_variants(bundle, plan, opts, variants, device)
    rows = report(runs, prompts, judge)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**provenance(), "model": fam.name,
            "weights": bundle.source, "clip": str(args.clip), "plan": plan.describe(), "prompts": prompts}
    (out / "precision-quality.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    text = table(rows, variants[0])
    (out / "precision-quality.md").write_text(f"# Precision against {variants[0]}, {fam.name}\n\n{text}\n")
    print(text)
    for name, r in runs.items():  # the first image of each variant, to look at
        from PIL import Image

        Image.fromarray(r["images"][0]).save(out / f"{name}-0.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
