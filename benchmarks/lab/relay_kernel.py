"""Fused relay kernel vs the torch relay (clamp + interpolate + clamp + cast) at the relay sizes, on one GPU.

    python benchmarks/lab/relay_kernel.py --output DIR

GPU time: CUDA events around `iters` back-to-back calls queued behind a device-side sleep (so Python launch
cost is hidden), median over `samples`. Call time: one synchronised call, wall clock, median (what an eager
caller pays, launch included). GB/s counts the useful bytes: input read once plus output written once.
Writes DIR/relay_kernel.json and DIR/relay_kernel.md and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megafusion.runtime import fused_relay
from megafusion.benchmarks.timing import provenance

F16, F32 = torch.float16, torch.float32


@dataclass(frozen=True)
class Case:
    name: str
    src: int  # square decoder output side
    dst: int
    in_dtype: torch.dtype
    out_dtype: torch.dtype = F16  # the fp16 VAE encoder's input


CASES = [
    Case("SDXL 1024->2048", 1024, 2048, F16), Case("SDXL 1024->2048", 1024, 2048, F32),
    Case("SD1.5 512->768", 512, 768, F16), Case("SD1.5 512->768", 512, 768, F32),
    Case("SD1.5 768->1024", 768, 1024, F16), Case("SD1.5 768->1024", 768, 1024, F32),
]


def gpu_ms(fn: Callable[[], object], iters: int, samples: int, warmup: int) -> float:
    """Median device milliseconds per call, launch overhead hidden behind a queued sleep."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU spin: the CPU queues all `iters` calls meanwhile
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def call_ms(fn: Callable[[], object], samples: int) -> float:
    """Median wall milliseconds of one synchronised call (Python launch included)."""
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(case: Case, iters: int, samples: int, warmup: int) -> dict[str, object]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1, 3, case.src, case.src, generator=gen, device="cuda") * 1.5).to(case.in_dtype)
    if not fused_relay.kernel_supported(x, case.out_dtype):
        raise SystemExit("the fused kernel is unavailable here (is cuda-python installed?)")
    out = torch.empty(1, 3, case.dst, case.dst, dtype=case.out_dtype, device="cuda")

    def kernel() -> object:
        return fused_relay.relay_resize(x, case.dst, case.dst, case.out_dtype, out=out)

    def reference() -> torch.Tensor:
        return fused_relay.torch_relay_resize(x, case.dst, case.dst, case.out_dtype)

    moved = x.numel() * x.element_size() + out.numel() * out.element_size()
    k_ms, t_ms = gpu_ms(kernel, iters, samples, warmup), gpu_ms(reference, iters, samples, warmup)
    kernel()
    diff = (out.float() - reference().float()).abs().max().item()
    return {
        "case": case.name, "in_dtype": str(case.in_dtype).removeprefix("torch."),
        "out_dtype": str(case.out_dtype).removeprefix("torch."), "bytes": moved,
        "kernel_ms": k_ms, "torch_ms": t_ms, "speedup": t_ms / k_ms,
        "kernel_gbps": moved / k_ms / 1e6, "torch_gbps": moved / t_ms / 1e6,
        "kernel_call_ms": call_ms(kernel, samples), "torch_call_ms": call_ms(reference, samples),
        "max_abs_diff": diff,
    }


def markdown(rows: list[dict[str, object]], device: str) -> str:
    head = ("| case | dtype | kernel ms | torch ms | torch/kernel | kernel GB/s | torch GB/s | kernel call ms "
            "| torch call ms | max abs diff |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['case']} | {r['in_dtype']}->{r['out_dtype']} | {r['kernel_ms']:.4f} | {r['torch_ms']:.4f} | "
        f"{r['speedup']:.2f}x | {r['kernel_gbps']:.0f} | {r['torch_gbps']:.0f} | {r['kernel_call_ms']:.4f} | "
        f"{r['torch_call_ms']:.4f} | {r['max_abs_diff']:.2e} |\n" for r in rows)
    return f"Relay resize (batch 1, 3 channels) on {device}; GB/s = (input + output bytes) / GPU time.\n\n{head}{body}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="folder for relay_kernel.json and relay_kernel.md")
    parser.add_argument("--iters", type=int, default=50, help="calls per timed sample")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.cuda.get_device_name()
    fused_relay.load(torch.cuda.current_device())  # compile/load before timing
    rows = [run_case(c, args.iters, args.samples, args.warmup) for c in CASES]
    table = markdown(rows, device)
    print(table)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        meta = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                "nvrtc": list(fused_relay.nvrtc_version()), "iters": args.iters, "samples": args.samples,
                "warmup": args.warmup}
        (args.output / "relay_kernel.json").write_text(json.dumps(provenance() | meta | {"results": rows}, indent=2) + "\n")
        (args.output / "relay_kernel.md").write_text(table)


if __name__ == "__main__":
    main()
