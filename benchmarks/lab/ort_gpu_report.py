"""Pure helpers of the ONNX Runtime CUDA-EP benchmark (`ort_gpu.py`): arguments, the results file written
after every step (so a run cut off by a time limit still leaves what it measured), export rows, output
differences and the Markdown summary. Nothing here needs a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megafusion.benchmarks.timing import provenance

DEFAULT_ENGINE_DIR = "/tmp/megafusion-ort-engines"
"""Outside --output: the SDXL engines are ~13 GB and the output folder is what gets copied back."""

JSON_NAME, MD_NAME = "ort_gpu.json", "ort_gpu.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 benchmarks/lab/ort_gpu.py",
        description="Export real-size random-weight models to ONNX, run them on ONNX Runtime's CUDA EP and "
                    "compare with the torch backend in the same process.")
    p.add_argument("--output", required=True, help="folder for ort_gpu.json and ort_gpu.md (written as it goes)")
    p.add_argument("--model", default="sdxl", choices=("sdxl", "sd15", "tiny-sdxl", "tiny-sd15"),
                   help="model of the export/latency/generation steps (tiny-*: smoke tests)")
    p.add_argument("--engine-dir", default=DEFAULT_ENGINE_DIR,
                   help=f"engine cache folder, one subfolder per model (default {DEFAULT_ENGINE_DIR}); "
                        "entries already built there are reused")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the generation")
    p.add_argument("--vae-precision", choices=("fp32", "fp16"),
                   help="VAE engines' precision (default: the plan's, fp32 for SDXL)")
    p.add_argument("--force", action="store_true", help="rebuild engines even if present and valid")
    p.add_argument("--conv-algo-search", choices=("EXHAUSTIVE", "HEURISTIC", "DEFAULT"), default="EXHAUSTIVE",
                   help="the CUDA EP's cudnn_conv_algo_search")
    p.add_argument("--generation-unet-graphs", action="store_true",
                   help="run the generation's UNets through one ORT CUDA graph per shape")
    p.add_argument("--ort-optimize", choices=("none", "cpu", "cuda"),
                   help="ORT transformer-optimizer fusion of the exported graphs (default: cuda on a GPU, else none)")
    p.add_argument("--check-load", action="store_true",
                   help="open every exported model on the CUDA EP inside the build too (one more session each)")
    p.add_argument("--skip-export", action="store_true", help="use the engines already in --engine-dir")
    p.add_argument("--skip-unet", action="store_true", help="skip the UNet latency step")
    p.add_argument("--skip-generation", action="store_true", help="skip the whole-generation step")
    p.add_argument("--skip-sd15-export", action="store_true", help="skip the extra SD1.5 export (when --model sdxl)")
    p.add_argument("--no-hybrid-fallback", action="store_true",
                   help="if the all-ORT generation fails, do not retry with the torch VAE")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time the standard UNet through ORT CUDA graphs (one more UNet session)")
    p.add_argument("--unet-warmup", type=int, default=3)
    p.add_argument("--unet-iters", type=int, default=10)
    p.add_argument("--gen-repeats", type=int, default=2, help="timed generations per backend, after one warm-up")
    p.add_argument("--prompt", default="a photo of a red fox in the snow, highly detailed")
    args = p.parse_args(argv)
    if args.unet_warmup < 0 or args.unet_iters < 1 or args.gen_repeats < 1:
        p.error("--unet-warmup must be >= 0, --unet-iters and --gen-repeats >= 1")
    return args


def cuda_problem() -> str | None:
    """Why this machine cannot run the benchmark (no CUDA device, no ORT CUDA EP), or None."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch; run this on the GPU machine"
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime is not importable ({e}); install onnxruntime-gpu (benchmarks/gpu/ort_gpu_install.sh)"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return (f"onnxruntime {ort.__version__} from {os.path.dirname(ort.__file__)} has no CUDAExecutionProvider "
                f"(providers: {', '.join(providers)}); install onnxruntime-gpu (benchmarks/gpu/ort_gpu_install.sh) "
                "and put it first on PYTHONPATH")
    return None


class Report:
    """The results dict, rewritten (atomically) as JSON and Markdown after every change."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {**provenance(), "started_unix": time.time(), "steps": {}}

    def step(self, name: str) -> dict[str, Any]:
        return self.data["steps"].setdefault(name, {})

    def save(self) -> None:
        self.data["updated_unix"] = time.time()
        for name, text in ((JSON_NAME, json.dumps(self.data, indent=2, default=str)), (MD_NAME, markdown(self.data))):
            tmp = self.dir / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.dir / name)  # a kill mid-write leaves the previous complete file

    @contextlib.contextmanager
    def guarded(self, name: str) -> Iterator[dict[str, Any]]:
        """A step: timed, saved when it ends; an exception is recorded (not raised) and the run goes on."""
        st = self.step(name)
        st["status"] = "running"
        self.save()
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            yield st
            st["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is a result to report, not a reason to stop
            st["status"] = "error"
            st["error"] = f"{type(e).__name__}: {e}"[:4000]
            st["traceback"] = traceback.format_exc()[-6000:]
            print(f"!! {name} failed: {st['error'][:1000]}", flush=True)
        finally:
            st["seconds"] = round(time.perf_counter() - t0, 3)
            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                st["gpu_used_gib_after"] = round((total - free) / 2**30, 2)  # ORT's arenas included
            self.save()
            print(f"== {name}: {st['status']} in {st['seconds']:.1f} s", flush=True)


def _file_sizes(files) -> tuple[int, int]:
    """(model file bytes, external data bytes) of an entry's file records."""
    model = sum(f.size for f in files if not f.path.endswith(".data"))
    data = sum(f.size for f in files if f.path.endswith(".data"))
    return model, data


def export_rows(build_report, vae_scale: int) -> list[dict[str, Any]]:
    """One row per entry of a `BuildReport`: export seconds, whole build seconds, ONNX and external data size."""
    rows = []
    for entry, seconds in build_report.built:
        exp = build_report.exports.get(entry.digest)
        rows.append(_row(entry, vae_scale, "built", exp.seconds if exp else None, seconds))
        if entry.digest in getattr(build_report, "fused", {}):
            rows[-1]["fused_ops"] = build_report.fused[entry.digest]
    for entry in build_report.skipped:
        rows.append(_row(entry, vae_scale, "skipped (already built)", None, None))
    return rows


def _row(entry, vae_scale: int, status: str, export_s: float | None, build_s: float | None) -> dict[str, Any]:
    from megafusion.core.specs import profile_sizes

    k = entry.key
    model_b, data_b = _file_sizes(entry.files)
    mid = f"-{k.variant}" if k.network == "unet" else ""
    return {"network": f"{k.network}{mid}-{k.precision}", "status": status,
            "sizes": profile_sizes(k.network, k.profiles, vae_scale) or ["fixed"],
            "export_s": None if export_s is None else round(export_s, 2),
            "build_s": None if build_s is None else round(build_s, 2),
            "onnx_bytes": model_b, "external_data_bytes": data_b, "total_bytes": model_b + data_b}


def tensor_diff(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference, the same relative to the reference's largest magnitude, and L2 relative."""
    g, r = got.detach().float().flatten(), ref.detach().float().flatten().to(got.device)
    d = (g - r).abs()
    ref_max = float(r.abs().max()) if r.numel() else 0.0
    max_abs = float(d.max()) if d.numel() else 0.0
    return {"max_abs": max_abs, "ref_max_abs": ref_max, "max_rel": max_abs / ref_max if ref_max else float("nan"),
            "relerr_l2": float(d.norm() / r.norm()) if float(r.norm()) else float("nan"),
            "nonfinite": int((~torch.isfinite(g)).sum())}


def image_diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """uint8 images: largest and mean absolute difference, and the share of differing values."""
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs_uint8": int(d.max()), "mean_abs_uint8": float(d.mean()), "frac_differing": float((d > 0).mean())}


def time_summary(seconds: list[float], first_s: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"median_ms": statistics.median(seconds) * 1000, "min_ms": min(seconds) * 1000,
                           "all_ms": [round(s * 1000, 3) for s in seconds]}
    if first_s is not None:
        out["first_ms"] = first_s * 1000  # includes cuDNN algorithm search at a new shape
    return out


def _mib(b: Any) -> str:
    return f"{b / 2**20:.1f}" if isinstance(b, (int, float)) else "-"


def _num(x: Any, fmt: str = "{:.1f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def markdown(data: dict[str, Any]) -> str:
    """The human summary of whatever the results dict holds so far."""
    env = data.get("environment", {})
    lines = [f"# ONNX Runtime CUDA EP vs torch, {env.get('device_name', '?')}", ""]
    if env:
        lines += [f"torch {env.get('torch')}, CUDA {env.get('cuda')}, onnxruntime {env.get('onnxruntime')}, "
                  f"driver {env.get('driver')}, diffusers {env.get('diffusers')}", ""]
    if data.get("fatal"):
        lines += [f"**Not run:** {data['fatal']}", ""]
    steps = data.get("steps", {})
    for name, st in steps.items():
        lines.append(f"## {name}: {st.get('status', '?')} ({_num(st.get('seconds'))} s, "
                     f"GPU used after {_num(st.get('gpu_used_gib_after'))} GiB)")
        lines.append("")
        for key in ("plan", "model_load_s", "engine_dir", "open_s", "description", "vae_precision", "providers",
                    "case", "session_s", "timing", "diff_vs_ort_eager"):
            if key in st:
                lines.append(f"- {key}: {st[key]}")
        if "rows" in st:
            lines += ["", "| network | sizes | export s | build s | .onnx MiB | .data MiB | total MiB | status |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in st["rows"]:
                lines.append(f"| {r['network']} | {', '.join(r['sizes'])} | {_num(r['export_s'])} | "
                             f"{_num(r['build_s'])} | {_mib(r['onnx_bytes'])} | {_mib(r['external_data_bytes'])} | "
                             f"{_mib(r['total_bytes'])} | {r['status']} |")
        if "cases" in st:
            lines += ["", "| case | ORT median ms | torch median ms | ORT/torch | ORT first ms | max abs diff | "
                          "max rel diff | L2 rel |", "|---|---|---|---|---|---|---|---|"]
            for c in st["cases"]:
                o, t, d = c.get("ort", {}), c.get("torch", {}), c.get("diff", {})
                ratio = o["median_ms"] / t["median_ms"] if "median_ms" in o and t.get("median_ms") else None
                lines.append(f"| {c['case']} | {_num(o.get('median_ms'))} | {_num(t.get('median_ms'))} | "
                             f"{_num(ratio, '{:.2f}')} | {_num(o.get('first_ms'))} | {_num(d.get('max_abs'), '{:.3g}')} | "
                             f"{_num(d.get('max_rel'), '{:.3g}')} | {_num(d.get('relerr_l2'), '{:.3g}')} |")
        if "median_s" in st:
            lines.append(f"- median {st['median_s']:.3f} s over {len(st.get('all_s', []))} runs "
                         f"(first run {_num(st.get('first_s'), '{:.2f}')} s)")
            for seg, s in st.get("segments_s", {}).items():
                lines.append(f"    - {seg}: {s * 1000:.1f} ms")
        for key in ("image", "latent_relerr_l2", "latent_max_abs", "note"):
            if key in st:
                lines.append(f"- {key}: {st[key]}")
        if st.get("error"):
            lines.append(f"- **error**: `{st['error'][:800]}`")
        lines.append("")
    return "\n".join(lines) + "\n"
