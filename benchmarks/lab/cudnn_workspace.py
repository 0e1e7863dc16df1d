"""What makes the first compiled SDXL 2048 generation's 137.5 GiB transient: the SDXL VAE decode at 2048x2048
(random weights, real config), eager and compiled, with cuDNN's algorithm search (`cudnn.benchmark`) on or off
and with its workspace capped (CUDNN_CONV_WSCAP_DBG, MiB, read once per process), each case in a fresh process.
Prints and writes (JSON) the first call's and the second call's peak allocated / reserved memory and times.

    python3 benchmarks/lab/cudnn_workspace.py --output $OUT/cudnn_workspace.json [--compiled]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = [  # (name, benchmark, workspace cap MiB or None, dtype)
    ("fp32, benchmark off", False, None, "float32"),
    ("fp32, benchmark on", True, None, "float32"),
    ("fp32, benchmark on, cap 2048 MiB", True, 2048, "float32"),
    ("bf16, benchmark on", True, None, "bfloat16"),
    ("bf16, benchmark on, cap 2048 MiB", True, 2048, "bfloat16"),
]


def child(benchmark: bool, dtype: str, compiled: bool) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from megafusion.core.families import SDXL

    torch.backends.cudnn.benchmark = benchmark
    with torch.device("cuda"):
        vae = AutoencoderKL(**SDXL.vae).to(getattr(torch, dtype)).eval()
    decode = (lambda z: vae.decode(z).sample)
    if compiled:
        decode = torch.compile(decode, fullgraph=True, dynamic=False)
    z = torch.randn(1, 4, 256, 256, device="cuda", dtype=vae.dtype)
    out = {}
    for run in ("first", "second"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            decode(z)
        torch.cuda.synchronize()
        out[run] = {"seconds": time.perf_counter() - t0,
                    "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output", required=True)
    p.add_argument("--compiled", action="store_true", help="also the torch.compile'd decode (a minute per case)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0] == "1", a.child[1], a.child[2] == "1")))
        return 0
    rows = []
    for compiled in ((False, True) if a.compiled else (False,)):
        for name, bench, cap, dtype in CASES:
            env = dict(os.environ)
            env.pop("CUDNN_CONV_WSCAP_DBG", None)
            if cap:
                env["CUDNN_CONV_WSCAP_DBG"] = str(cap)
            r = subprocess.run([sys.executable, __file__, "--output", "-", "--child", "1" if bench else "0", dtype,
                                "1" if compiled else "0"], capture_output=True, text=True, env=env)
            got = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-400:]}
            row = {"case": name, "compiled": compiled, **got}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(a.output, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
