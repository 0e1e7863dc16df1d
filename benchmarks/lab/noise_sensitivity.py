"""How much the initial noise's dtype moves an image: the same plan, seed and weights, noise drawn in fp16 and in
fp32 (the draws differ by fp16 rounding, at most about 2e-3), and fp16 twice (determinism).

python benchmarks/lab/noise_sensitivity.py --model sdxl --stages 1024x1024:8 --output DIR

Why it exists: libmegafusion drew fp32 noise while the Python runtime drew it in the UNet module's dtype; on the
H100 with random SDXL weights that alone made the images 47 levels apart on average. Both now draw in the UNet's
precision (runtime/pipeline.py, cpp/src/lib/context.cpp). Writes noise_sensitivity.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from megafusion.benchmarks.timing import provenance


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/noise_sensitivity.py")
    p.add_argument("--model", default="sdxl")
    p.add_argument("--stages", default="1024x1024:8")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    from megafusion.engine.networks import TorchNetworks
    from megafusion.core.loading import load_model, to_device
    from megafusion.core.plan import parse_stages, validate_plan
    from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    bundle = to_device(load_model(args.model, random_weights=True, seed=0), dev, dtype)
    plan = validate_plan(bundle.family, parse_stages(args.stages))
    opts = GenerationOptions("a photo of a red fox in the snow, highly detailed", seed=0)
    pipe = MegaFusionPipeline(bundle, TorchNetworks(bundle), dev)
    images = {}
    for name, noise in (("fp16", torch.float16), ("fp32", torch.float32), ("fp16-again", torch.float16)):
        pipe.noise_dtype = noise
        images[name] = pipe.generate(plan, opts).image.astype(int)
    report = {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "model": args.model, "plan": plan.describe(), "module_dtype": str(dtype), "pairs": {}}
    for a, b in (("fp16", "fp32"), ("fp16", "fp16-again")):
        d = np.abs(images[a] - images[b])
        report["pairs"][f"{a} vs {b}"] = {"max": int(d.max()), "mean": float(d.mean())}
        print(f"noise {a} vs {b}: image max {d.max()} mean {d.mean():.2f} levels", flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise_sensitivity.json").write_text(json.dumps(provenance() | report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
