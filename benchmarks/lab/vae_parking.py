"""The tiled VAE with and without parking (runtime/vae_parking.py), alone: SDXL's VAE at random weights.

python benchmarks/lab/vae_parking.py --sizes 4096,8192 --output DIR

Per size: the tiled decode and encode, parked and (where --max-memory allows its estimate) unparked; wall time,
peak allocated device memory above the input, against the meta-device estimate and the host buffers it
counts, the process's peak host memory, and whether parked equals unparked bit for bit (deterministic cuDNN).
Writes vae_parking.json into DIR.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from megafusion.benchmarks.timing import provenance
from megafusion.core.families import SDXL
from megafusion.core.memory import GiB, LiveBytes
from megafusion.runtime.vae_parking import HostParking, ShapeParking
from megafusion.runtime.vae_tiling import tiled_decode, tiled_encode


def _estimate(meta_vae, run, shape, dtype, tile, park):
    parking, counter = ShapeParking() if park else None, LiveBytes()
    with torch.inference_mode(), counter:
        run(meta_vae, torch.zeros(shape, device="meta", dtype=dtype), tile, parking)
    return counter.peak, parking.host_peak if parking else 0


def _measure(vae, run, x, tile, park):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = run(vae, x, tile, HostParking(x.device) if park else None)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4096,8192", help="comma-separated image sides in pixels")
    p.add_argument("--tile", type=int, default=2048)
    p.add_argument("--max-memory", type=float, default=100.0, help="GiB: an unparked pass estimated above this "
                                                                    "is skipped")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    from diffusers import AutoencoderKL

    dtype = torch.bfloat16
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL.vae).to("cuda", dtype).eval()
    with torch.device("meta"):
        meta_vae = AutoencoderKL(**SDXL.vae)
    torch.nn.Module.to(meta_vae, dtype=dtype)
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        for name, run, shape in (("decode", tiled_decode, (1, 4, side // 8, side // 8)),
                                 ("encode", tiled_encode, (1, 3, side, side))):
            x = torch.randn(shape, device="cuda", dtype=dtype).clamp(-1, 1)
            outs = {}
            for park in (True, False):
                est, host = _estimate(meta_vae, run, shape, dtype, args.tile, park)
                row = {"size": side, "pass": name, "parked": park, "estimate_gib": est / GiB,
                       "estimated_host_gib": host / GiB}
                if est > args.max_memory * GiB:
                    row["skipped"] = f"estimate {est / GiB:.1f} GiB above --max-memory"
                else:
                    with torch.inference_mode():
                        out, secs, peak = _measure(vae, run, x, args.tile, park)
                    outs[park] = out
                    row.update(seconds=secs, peak_allocated_gib=peak / GiB,
                               host_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB)
                print(row, flush=True)
                rows.append(row)
            if len(outs) == 2:
                rows[-2]["equals_unparked_bitwise"] = bool(torch.equal(outs[True], outs[False]))
                print(f"{side} {name}: parked equals unparked bit for bit: {rows[-2]['equals_unparked_bitwise']}")
            del outs, x
            torch.cuda.empty_cache()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vae_parking.json").write_text(json.dumps({"rows": rows, "tile": args.tile, "provenance": provenance(),
                                                      "device": torch.cuda.get_device_name(),
                                                      "torch": torch.__version__}, indent=2, default=str))


if __name__ == "__main__":
    main()
