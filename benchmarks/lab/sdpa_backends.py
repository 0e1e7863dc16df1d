"""Times torch's SDPA backends at the UNet's attention shapes (CUDA events, median of repeats).

python benchmarks/lab/sdpa_backends.py --output DIR [--shapes sd15-4096-l1,...]

SD1.5 has attention at its highest level (head dim 40): at 4096 that is 262,144 tokens, 4.1 s of each 4096 step
(#19). Each backend also runs with the head dim zero-padded to 64 (`<backend>-pad64`, scale kept at 1/sqrt(40)):
the same output, for kernels whose head-dim-40 path is slower than their 64 one. TFLOP/s count head dim 40.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from megafusion.benchmarks.timing import provenance
from torch.nn.attention import SDPBackend, sdpa_kernel

# (name, batch, heads, tokens, head_dim): SDXL self-attention at 1024 and 2048 (CFG batch 2), SD1.5 at 1024.
SHAPES = [
    ("sdxl-1024-l2", 2, 10, 4096, 64), ("sdxl-1024-l3", 2, 20, 1024, 64),
    ("sdxl-2048-l2", 2, 10, 16384, 64), ("sdxl-2048-l3", 2, 20, 4096, 64),
    ("sd15-1024-l1", 2, 8, 16384, 40), ("sd15-1024-l2", 2, 8, 4096, 80),
    ("sd15-2048-l1", 2, 8, 65536, 40), ("sd15-4096-l1", 2, 8, 262144, 40),
]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_ms(fn, reps=20) -> float:
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output", default=".")
    p.add_argument("--shapes", help="comma-separated names of SHAPES (default: all)")
    args = p.parse_args(argv)
    names = [s[0] for s in SHAPES]
    wanted = names if not args.shapes else args.shapes.split(",")
    if unknown := [w for w in wanted if w not in names]:
        p.error(f"--shapes {','.join(unknown)}: not among {', '.join(names)}")
    rows = []
    for name, b, h, n, d in (s for s in SHAPES if s[0] in wanted):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = 4 * b * h * n * n * d
        reps = 20 if flops < 1e13 else 5
        row = {"shape": name, "tflop": flops / 1e12}
        padded = None if d % 64 == 0 else [F.pad(t, (0, 64 - d % 64)) for t in (q, k, v)]
        inputs = {"": (q, k, v)} | ({"-pad64": padded} if padded else {})
        for bname, backend in BACKENDS.items():
            for suffix, (qq, kk, vv) in inputs.items():
                label = bname + suffix
                try:
                    with sdpa_kernel([backend]):
                        ms = time_ms(lambda: F.scaled_dot_product_attention(qq, kk, vv, scale=d ** -0.5), reps)
                    row[label] = {"ms": ms, "tflops": flops / ms / 1e9}
                except RuntimeError as e:
                    row[label] = {"error": str(e).splitlines()[0][:120]}
        del q, k, v, padded, inputs
        rows.append(row)
        print(name, {k: (f"{v['ms']:.3f} ms {v['tflops']:.0f} TF/s" if "ms" in v else v["error"])
                     for k, v in row.items() if isinstance(v, dict)}, flush=True)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "sdpa_backends.json").write_text(json.dumps(
        provenance() | {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
