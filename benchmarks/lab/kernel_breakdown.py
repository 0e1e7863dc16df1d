"""Where a forward pass spends its GPU time: kernel time by category (attention, convolution, GEMM, norm and
elementwise), from torch.profiler, for the SDXL UNet (CFG batch 2) and VAE at the plan's sizes, under each
SDPA backend. Eager modules (fused QKV, channels_last optional): the matmul, conv and attention kernels are the
ones the compiled path calls too; what compile changes is the norm/elementwise share.

python benchmarks/lab/kernel_breakdown.py --model sdxl --output DIR
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from megafusion.core.dilation import mid_dilation
from megafusion.core.loading import load_model
from megafusion.benchmarks.timing import provenance

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")):
        return "attention"
    if any(k in n for k in ("conv", "fprop", "dgrad", "implicit", "winograd", "nchwtonhwc", "nhwctonchw")):
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "matmul", "xmma")):
        return "gemm"
    if any(k in n for k in ("norm", "welford")):
        return "norm"
    return "elementwise/other"


def breakdown(fn, reps: int = 3) -> dict:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    cats: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    launches = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time / reps if hasattr(e, "device_time") else e.cuda_time / reps
            cats[category(e.name)] += us / 1e3
            kernels[e.name[:110]] += us / 1e3
            launches += not e.name.startswith(("Memcpy", "Memset"))  # copies and memsets are not kernels
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"total_ms": sum(cats.values()), "by_category_ms": dict(cats),
            "top_kernels_ms": [[k, round(v, 3)] for k, v in top], "kernels_per_call": launches / reps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sdxl")
    p.add_argument("--sizes", default="1024,2048")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--output", default=".")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    b = load_model(args.model, random_weights=True, device=dev, dtype=torch.float16)
    b.unet.fuse_qkv_projections()
    b.vae.fuse_qkv_projections()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    b.unet.to(memory_format=fmt)
    b.vae.to(memory_format=fmt)
    torch.backends.cudnn.benchmark = True
    fam = b.family
    te_dim = b.unet.config.cross_attention_dim
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        lat = side // fam.vae_scale
        z = torch.randn(2, 4, lat, lat, device=dev, dtype=torch.float16).to(memory_format=fmt)
        ehs = torch.randn(2, 77, te_dim, device=dev, dtype=torch.float16)
        t = torch.tensor(501, device=dev)
        added = None
        if fam.is_xl:
            added = {"text_embeds": torch.randn(2, 1280, device=dev, dtype=torch.float16),
                     "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, device=dev,
                                              dtype=torch.float16)}
        for variant, delta in (("standard", 1), ("dilated", 2)):
            for bname, backend in BACKENDS.items():
                def unet():
                    with torch.no_grad(), sdpa_kernel([backend]), mid_dilation(b.unet, delta):
                        b.unet(z, t, ehs, added_cond_kwargs=added, return_dict=False)
                try:
                    r = breakdown(unet)
                except RuntimeError as e:
                    r = {"error": str(e).splitlines()[0][:200]}
                rows.append({"net": f"unet-{variant}", "size": side, "attention": bname, **r})
                print(json.dumps(rows[-1])[:900], flush=True)
        img = torch.randn(1, 3, side, side, device=dev, dtype=torch.float16).to(memory_format=fmt)
        zl = torch.randn(1, 4, lat, lat, device=dev, dtype=torch.float16).to(memory_format=fmt)
        for bname, backend in BACKENDS.items():
            for net, fn in (("vae-decode", lambda: b.vae.decode(zl, return_dict=False)),
                            ("vae-encode", lambda: b.vae.encode(img).latent_dist.mean)):
                def run(fn=fn):
                    with torch.no_grad(), sdpa_kernel([backend]):
                        fn()
                try:
                    r = breakdown(run, reps=2)
                except RuntimeError as e:
                    r = {"error": str(e).splitlines()[0][:200]}
                rows.append({"net": net, "size": side, "attention": bname, **r})
                print(json.dumps(rows[-1])[:900], flush=True)
        torch.cuda.empty_cache()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_breakdown.json").write_text(json.dumps(
        provenance() | {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
         "channels_last": args.channels_last, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
