"""Times torch's SDPA backends at the UNet's attention shapes (CUDA events, median of repeats).

python benchmarks/lab/sdpa_backends.py --output DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from megafusion.benchmarks.timing import provenance
from torch.nn.attention import SDPBackend, sdpa_kernel

# (name, batch, heads, tokens, head_dim): SDXL self-attention at 1024 and 2048 (CFG batch 2), SD1.5 at 1024.
SHAPES = [
    ("sdxl-1024-l2", 2, 10, 4096, 64), ("sdxl-1024-l3", 2, 20, 1024, 64),
    ("sdxl-2048-l2", 2, 10, 16384, 64), ("sdxl-2048-l3", 2, 20, 4096, 64),
    ("sd15-1024-l1", 2, 8, 16384, 40), ("sd15-1024-l2", 2, 8, 4096, 80),
]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_ms(fn, reps=20) -> float:
    for _ in range(3):
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
    args = p.parse_args(argv)
    rows = []
    for name, b, h, n, d in SHAPES:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = 4 * b * h * n * n * d
        row = {"shape": name, "tflop": flops / 1e12}
        for bname, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
                row[bname] = {"ms": ms, "tflops": flops / ms / 1e9}
            except RuntimeError as e:
                row[bname] = {"error": str(e).splitlines()[0][:120]}
        rows.append(row)
        print(name, {k: (f"{v['ms']:.3f} ms {v['tflops']:.0f} TF/s" if "ms" in v else v["error"])
                     for k, v in row.items() if isinstance(v, dict)}, flush=True)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "sdpa_backends.json").write_text(json.dumps(
        provenance() | {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
