"""Attention kernel per module, measured where it matters: the SDXL UNet's self-attention shapes
(head dim 64, CFG batch 2) at 1024 and 2048 under each UNet kernel, against a float32 reference; the SDXL
VAE's single 512-dim head at 16384 and 65536 tokens (torch's SDPA against `engine.attention.chunked`); then
the compiled SDXL UNet and VAE at 2048 with each kernel choice, with the kernel-time breakdown of each
compiled forward.

python benchmarks/lab/attention_paths.py --output DIR [--unet-kernels cudnn,fa4] [--micro-only]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from megafusion.engine.attention import attend_fn, chunked, sdpa, set_attention
from megafusion.core.loading import load_model
from megafusion.benchmarks.timing import provenance

from kernel_breakdown import breakdown
from sdpa_backends import time_ms


def vae_attention_micro(rows: list) -> None:
    for n in (16384, 65536):
        q, k, v = (torch.randn(1, 1, n, 512, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = 4 * n * n * 512
        ref = sdpa(q, k, v)
        for name, fn in [("sdpa", sdpa)] + [(f"chunked-{c}", chunked(c)) for c in (2048, 4096, 8192)]:
            ms = time_ms(lambda: fn(q, k, v), reps=10)
            err = (fn(q, k, v).float() - ref.float()).abs().max().item()
            rows.append({"what": f"vae-attention-{n}", "kernel": name, "ms": ms, "tflops": flops / ms / 1e9,
                         "max_abs_diff_vs_sdpa": err})
            print(json.dumps(rows[-1]), flush=True)


def unet_attention_micro(rows: list, kernels: list[str], sides=(1024, 2048)) -> None:
    """SDXL self-attention as the UNet calls it: q, k, v are views of one fused QKV projection."""
    for side in sides:
        for level, heads in ((1, 10), (2, 20)):  # latent / 2**level tokens per side; 640 and 1280 channels
            n = (side // 8 // 2 ** level) ** 2
            qkv = torch.randn(2, n, 3 * heads * 64, device="cuda", dtype=torch.float16)
            q, k, v = (x.view(2, n, heads, 64).transpose(1, 2) for x in qkv.chunk(3, dim=-1))
            ref = chunked(2048)(q.float(), k.float(), v.float())
            flops = 4 * 2 * heads * n * n * 64
            for name in kernels:
                fn = attend_fn(name)
                ms = time_ms(lambda: fn(q, k, v), reps=20)
                err = fn(q, k, v).float() - ref
                rows.append({"what": f"unet-attention-{side}-level{level}", "tokens": n, "heads": heads,
                             "kernel": name, "ms": ms, "tflops": flops / ms / 1e9,
                             "max_abs_vs_fp32": err.abs().max().item(),
                             "rel_l2_vs_fp32": (err.norm() / ref.norm()).item()})
                print(json.dumps(rows[-1]), flush=True)


def compiled(fn, label: str, rows: list, reps: int = 10, **extra) -> None:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        ms = time_ms(fn, reps=reps)
        bd = breakdown(fn, reps=2)
    rows.append({"what": label, **extra, "compile_s": round(compile_s, 1), "ms": ms,
                 "by_category_ms": bd["by_category_ms"], "top_kernels_ms": bd["top_kernels_ms"][:6]})
    print(json.dumps(rows[-1])[:1500], flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--side", type=int, default=2048)
    p.add_argument("--unet-kernels", default="sdpa,cudnn")
    p.add_argument("--vae-kernels", default="sdpa,chunked")
    p.add_argument("--micro-only", action="store_true", help="only the attention kernels, no compiled models")
    p.add_argument("--output", default=".")
    args = p.parse_args(argv)
    rows: list = []
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "attention_paths.json").write_text(json.dumps(
            provenance() | {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=2))

    unet_attention_micro(rows, args.unet_kernels.split(","))
    save()
    vae_attention_micro(rows)
    save()
    if args.micro_only:
        return 0
    dev = torch.device("cuda")
    b = load_model("sdxl", random_weights=True, device=dev, dtype=torch.float16)
    b.unet.fuse_qkv_projections()
    b.vae.fuse_qkv_projections()
    b.unet.to(memory_format=torch.channels_last)
    b.vae.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    side, lat = args.side, args.side // 8
    z = torch.randn(2, 4, lat, lat, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
    ehs = torch.randn(2, 77, 2048, device=dev, dtype=torch.float16)
    t = torch.tensor(501, device=dev)
    added = {"text_embeds": torch.randn(2, 1280, device=dev, dtype=torch.float16),
             "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, device=dev, dtype=torch.float16)}
    outs = {}
    for kernel in args.unet_kernels.split(","):
        set_attention(b.unet, kernel)
        torch._dynamo.reset()
        f = torch.compile(b.unet, fullgraph=True, dynamic=False)
        compiled(lambda: f(z, t, ehs, added_cond_kwargs=added, return_dict=False), f"unet-{side}", rows,
                 kernel=kernel, tflop=71.81)
        with torch.no_grad():
            outs[kernel] = f(z, t, ehs, added_cond_kwargs=added, return_dict=False)[0].float()
        save()
    if len(outs) > 1:
        a, *others = outs.values()
        for k, o in zip(list(outs)[1:], others):
            rows.append({"what": f"unet-{side}-diff", "kernel": k,
                         "rel": ((o - a).norm() / a.norm()).item()})
            print(json.dumps(rows[-1]), flush=True)
    zl = z[:1].contiguous(memory_format=torch.channels_last)
    img = torch.randn(1, 3, side, side, device=dev, dtype=torch.float16).to(memory_format=torch.channels_last)
    for kernel in args.vae_kernels.split(","):
        set_attention(b.vae, kernel)
        torch._dynamo.reset()
        dec = torch.compile(lambda x: b.vae.decode(x, return_dict=False)[0], fullgraph=True, dynamic=False)
        enc = torch.compile(lambda x: b.vae.encode(x).latent_dist.mean, fullgraph=True, dynamic=False)
        compiled(lambda: dec(zl), f"vae-decode-{side}", rows, reps=5, kernel=kernel, tflop=48.5)
        compiled(lambda: enc(img), f"vae-encode-{side}", rows, reps=5, kernel=kernel, tflop=26.1)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
