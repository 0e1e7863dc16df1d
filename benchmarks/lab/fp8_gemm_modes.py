"""Which `_scaled_mm` form pays at the UNet's own GEMM shapes: each shape the default `Fp8Policy` quantizes in one
UNet step (counted on the meta device after QKV fusion), timed as a bf16 linear, as FP8 with row-wise scales (what
engine/fp8.py runs: per-channel weight scales, the activation scale expanded per row) and as FP8 with one scale per
tensor (cuBLASLt's form, which also writes fp16; it would need per-tensor weight scales). The step's sum per form
says what the scaling form is worth before anyone builds it (#20).

python3 benchmarks/lab/fp8_gemm_modes.py --model sdxl --sizes 1024x1024,2048x2048 --device cuda --output DIR
writes fp8_gemm_modes_<model>.json and .md with the GPU, commit and command. Times: CUDA events, median of
--repeats after --warmup calls, each form of a shape in the same loop. On the CPU (tests/lab) the shapes are counted
and each form runs once at a tiny model's shapes: plumbing only, no timing worth reading.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from megafusion.benchmarks.flops import unet_meta_inputs
from megafusion.benchmarks.timing import provenance, time_call
from megafusion.core.families import get_family
from megafusion.core.plan import PlanError, parse_size

FORMS = ("bf16", "fp8-rows", "fp8-tensor")
FP8 = torch.float8_e4m3fn


def gemm_shapes(family, height: int, width: int, batch: int = 2) -> Counter:
    """{(M, K, N): count} of one UNet step's GEMMs in the default policy's layers (after QKV fusion, as they run)."""
    from diffusers import UNet2DConditionModel

    from megafusion.engine.fp8 import Fp8Policy, fp8_candidates, is_pointwise_conv

    with torch.device("meta"):
        unet = UNet2DConditionModel(**family.unet)
    unet.fuse_qkv_projections()
    names = set(fp8_candidates(unet, Fp8Policy()))
    shapes: Counter = Counter()

    def hook(name):
        def record(m, args, out):
            x = args[0]
            if isinstance(m, nn.Linear):
                shapes[(x.numel() // m.in_features, m.in_features, m.out_features)] += 1
            elif is_pointwise_conv(m):
                shapes[(x.numel() // m.in_channels, m.in_channels, m.out_channels)] += 1
        return record

    for name, m in unet.named_modules():
        if name in names:
            m.register_forward_hook(hook(name))
    sample, t, states, added = unet_meta_inputs(family, height, width, batch)
    unet(sample, t, encoder_hidden_states=states, added_cond_kwargs=added)
    return shapes


def _operands(m: int, k: int, n: int, device):
    g = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    x = torch.randn(m, k, generator=g).to(device, torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(device, torch.bfloat16)
    return x, w, x.to(FP8), w.to(FP8)


def forms(m: int, k: int, n: int, device) -> dict:
    """The three callables of one shape, on operands of that shape."""
    x, w, xq, wq = _operands(m, k, n, device)
    rows_a = torch.ones(m, 1, device=device)
    rows_b = torch.ones(1, n, device=device)
    one = torch.ones((), device=device)
    fast = torch.device(device).type == "cuda"
    return {
        "bf16": lambda: nn.functional.linear(x, w),
        "fp8-rows": lambda: torch._scaled_mm(xq, wq.t(), scale_a=rows_a, scale_b=rows_b, out_dtype=torch.bfloat16,
                                             use_fast_accum=fast),
        "fp8-tensor": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float16,
                                               use_fast_accum=fast),
    }


def time_forms(m: int, k: int, n: int, device, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each form (CUDA events on a GPU; wall time on the CPU)."""
    calls, dev = forms(m, k, n, device), torch.device(device)
    out = {}
    for name, fn in calls.items():
        for _ in range(warmup):
            fn()
        out[name] = statistics.median(time_call(fn, dev)[0] * 1e3 for _ in range(repeats))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/fp8_gemm_modes.py")
    p.add_argument("--model", default="sdxl")
    p.add_argument("--sizes", default="1024x1024,2048x2048", help="stage sizes, WxH, comma-separated")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    family = get_family(args.model)
    try:
        sizes = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
    except PlanError as e:
        p.error(f"--sizes {args.sizes}: {e}")
    device = torch.device(args.device)
    if device.type == "cuda":
        from megafusion.engine.fp8 import fp8_unavailable

        if fp8_unavailable(device):
            p.error(fp8_unavailable(device))
    rows, totals = [], []
    for w, h in sizes:
        shapes = gemm_shapes(family, h, w)
        step = dict.fromkeys(FORMS, 0.0)
        for (m, k, n), count in sorted(shapes.items()):
            ms = time_forms(m, k, n, device, args.warmup, args.repeats)
            tflops = {f: 2 * m * k * n / (t * 1e-3) / 1e12 for f, t in ms.items()}
            rows.append({"size": f"{w}x{h}", "m": m, "k": k, "n": n, "count": count, "ms": ms, "tflops": tflops})
            for f in FORMS:
                step[f] += count * ms[f]
            print(f"  {w}x{h} {m}x{k}x{n} x{count}: " + ", ".join(f"{f} {ms[f]:.3f} ms" for f in FORMS), flush=True)
        totals.append({"size": f"{w}x{h}", "step_ms": step, "layers": sum(shapes.values())})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data = {**provenance(), "model": family.name, "device": device_name, "rows": rows, "totals": totals}
    (out / f"fp8_gemm_modes_{family.name}.json").write_text(json.dumps(data, indent=1))
    lines = [f"# FP8 GEMM forms at {family.name}'s shapes ({device_name})", "",
             "| size | layers | bf16 ms/step | fp8 rows ms/step | fp8 tensor ms/step | rows over bf16 | tensor over rows |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for t in totals:
        s = t["step_ms"]
        lines.append(f"| {t['size']} | {t['layers']} | {s['bf16']:.3f} | {s['fp8-rows']:.3f} | {s['fp8-tensor']:.3f} | "
                     f"{s['bf16'] / s['fp8-rows']:.2f}x | {s['fp8-rows'] / s['fp8-tensor']:.2f}x |")
    (out / f"fp8_gemm_modes_{family.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
