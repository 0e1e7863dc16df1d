"""libmegafusion (C++, no Python) beside the Python runtime, same plan, seed and prompt.

python benchmarks/lab/cpp_vs_python.py --model sdxl --engines DIR --cpp-bin BUILD/cpp/mf-generate-cpp \
    --output OUT [--size 2048x2048 | --stages S] [--modes cpp,cpp-no-graphs,python-aoti-graphs,python-compiled]

DIR holds `mf-build-engines --backend aoti` packages built from `--random-weights --weights-seed N` (this script loads
the same weights the same way, so the engines' weight fingerprints match). Modes, in this order, one process:
- `cpp`: `mf-generate-cpp --repeats R+1` in a subprocess (its first run is the warm-up, which captures the
  step graphs), wall time of each `mf_generate` call and the CUDA graph counters as the example prints them;
- `cpp-no-graphs`: the same with `--no-graphs` (the steps one by one), for the graphs' gain and image difference;
- `python-aoti`: `open_engines(..., backend="aoti")` on the same packages, the plain Python stage loop;
- `python-aoti-graphs`: the same packages under the runtime's CUDA-graphed denoise step (CUDA only);
- `python-eager`: the plain Python runtime on the torch modules themselves, same weights in the engines'
  precision, the VAE as the engines hold it (the reference the engines are checked against; with it, every
  other mode's image difference against it);
- `python-eager-alt-attention` (with `python-eager`): the same eager run with torch's attention kept off its default
  kernel (flash on CUDA: memory-efficient or math instead; math on the CPU): 16-bit eager against itself with one
  kernel choice changed, the spread a 50-step trajectory gives to any change of rounding;
- `python-compiled`: the compiled fast path (torch.compile + CUDA graphs) on the same weights, fp16 (CUDA only);
- `python-eager-fp32`: the plain Python runtime on the same modules in float32, TF32 off (CUDA only): how far the
  16-bit eager image itself is from full precision, the scale an engine's image difference is read against.
`networks` (no timing) first runs each package once against its torch module on the same inputs, at every
stage size, and records the largest difference (and the relative L2 one): it says which network an image
difference comes from. A 16-bit package is also held against the module in float32, beside the module in the
package's own dtype: a package that rounds differently from eager, not worse, is as far from float32 as eager is.
Each mode's final latent is compared with eager's too (relative L2), and decoded by eager's VAE and compared with
eager's image, which splits an image difference into the denoising and the decode.
Python times are wall time around `generate` (prompt to uint8 image, synchronized), median of R after one
warm-up. Image differences are against the C++ image. Writes cpp_vs_python.json and .md into OUT.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from megafusion.benchmarks.timing import provenance

MODES = ("networks", "cpp", "cpp-no-graphs", "python-aoti", "python-aoti-graphs", "python-eager",
         "python-eager-alt-attention", "python-compiled", "python-eager-fp32")
GPU_ONLY = ("python-aoti-graphs", "python-compiled", "python-eager-fp32")


def parse_cpp_output(text: str) -> tuple[float, list[float]]:
    """(engine load seconds, generate seconds per run) from mf-generate-cpp's last line."""
    m = re.search(r"engines loaded in ([0-9.]+) s; generate((?: [0-9.]+)+) s", text)
    if m is None:
        raise ValueError(f"mf-generate-cpp printed no timing line: {text[-500:]!r}")
    return float(m.group(1)), [float(x) for x in m.group(2).split()]


def parse_cpp_counters(text: str) -> dict:
    """{"graphs": "on"|"off", "captures": C, "replays": R} from mf-generate-cpp's last line ({} from an older
    build that prints no counters)."""
    m = re.search(r"graphs (on|off), (\d+) captures, (\d+) replays", text)
    return {} if m is None else {"graphs": m.group(1), "captures": int(m.group(2)), "replays": int(m.group(3))}


def image_diff(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"shape_mismatch": [list(a.shape), list(b.shape)]}
    d = np.abs(a.astype(int) - b.astype(int))
    return {"max": int(d.max()), "mean": float(d.mean())}


@contextlib.contextmanager
def no_tf32():
    """float32 products in float32 (torch's default for matmuls, not for cuDNN convolutions)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def other_attention(dev: torch.device):
    """torch's attention (`scaled_dot_product_attention`) kept off the kernel it picks by default: on CUDA the
    memory-efficient kernel or math where flash would run, on the CPU the math kernel. Returns the context and the
    backends it allows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if dev.type == "cuda" else [SDPBackend.MATH])
    return sdpa_kernel(allowed), [b.name for b in allowed]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_pipeline(pipe, plan, opts, repeats: int, dev: torch.device) -> tuple[dict, object]:
    def once():
        _sync(dev)
        t0 = time.perf_counter()
        res = pipe.generate(plan, opts)
        _sync(dev)
        return time.perf_counter() - t0, res

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    first, _ = once()
    runs = [once() for _ in range(repeats)]
    times = [t for t, _ in runs]
    entry = {"median_s": statistics.median(times), "all_s": times, "first_run_s": first}
    if dev.type == "cuda":
        entry["peak_torch_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return entry, runs[-1][1]


def check_networks(engines, bundle, plan, dev: torch.device) -> list[dict]:
    """Each AOTInductor package against its torch module (same weights, cast to the package's precision, on
    `dev`), one call at every size the plan runs it at; the largest absolute and relative differences."""
    from megafusion.engine.cache import EngineCache
    from megafusion.engine.backend import OpenContext, get_backend
    from megafusion.engine.load import open_entry
    from megafusion.core.dilation import mid_dilation
    from megafusion.export.onnx_export import cast_copy
    from megafusion.core.wrappers import wrap
    from megafusion.core.specs import UNET, plan_requirements

    entries = [e for e in EngineCache(engines).entries().values()
               if e.key.model == bundle.family.name and e.key.backend == "aoti"]
    vs, rows = bundle.family.vae_scale, []
    for r in plan_requirements(bundle.family, plan, "fp16" if dev.type == "cuda" else "fp32"):
        mine = [e for e in entries if e.key.network == r.spec.network and e.key.dilation == r.spec.dilation]
        if not mine:
            continue
        mine.sort(key=lambda e: e.created, reverse=True)  # newest first, as the runtimes choose
        runners, refs = {}, {}  # by digest (static packages: one entry per stage shape); modules by dtype
        for p in r.profiles:
            st = plan.stages[min(p.stage, len(plan.stages) - 1)]
            probe = r.spec.sample_inputs(r.spec.axes(r.spec.batch_range[2], st.height // vs, st.width // vs, vs))
            e = next((e for e in mine if all(e.key.profiles[0].covers(t.name, tuple(x.shape))
                                             for t, x in zip(r.spec.inputs, probe))), None)
            if e is None:
                print(f"[networks] no package of {r.spec.name} covers {st.width}x{st.height}", flush=True)
                continue
            if e.digest not in runners:
                runners[e.digest] = open_entry(Path(engines), e, get_backend("aoti"), OpenContext(bundle.family, dev))
            runner = runners[e.digest]
            spec = runner.spec
            dtype = spec.outputs[0].torch_dtype
            dtypes = (dtype,) if dtype == torch.float32 else (dtype, torch.float32)
            for dt in dtypes:
                if dt not in refs:
                    module = cast_copy(bundle.module_for(spec.network), dt).to(dev)
                    refs[dt] = (module, wrap(module, spec, bundle.family.is_xl).eval())
            axes = spec.axes(spec.batch_range[2], st.height // vs, st.width // vs, vs)
            feeds = {t.name: x.to(dev) for t, x in zip(spec.inputs, spec.sample_inputs(axes))}
            outs = {}
            with torch.inference_mode(), no_tf32():
                got = runner.run(feeds)
                for dt in dtypes:
                    module, ref_fn = refs[dt]
                    ctx = mid_dilation(module, spec.dilation) if spec.network == UNET else torch.no_grad()
                    with ctx:
                        # the package's own inputs; the float32 module gets them widened (exactly)
                        y = ref_fn(*(x.float() if dt == torch.float32 and x.is_floating_point() else x
                                     for x in feeds.values()))
                    outs[dt] = (y,) if isinstance(y, torch.Tensor) else tuple(y)
            for i, t in enumerate(spec.outputs):
                a, b = got[t.name].float(), outs[dtype][i].float()
                d = (a - b).abs().max().item()
                row = {"network": spec.name, "size": f"{st.width}x{st.height}", "output": t.name,
                       "max_abs": d, "rel": d / max(b.abs().max().item(), 1e-12), "rel_l2": rel_l2(a, b)}
                if dtype != torch.float32:  # both 16-bit computations against float32
                    full = outs[torch.float32][i].float()
                    row |= {"package_vs_fp32_rel_l2": rel_l2(a, full), "module_vs_fp32_rel_l2": rel_l2(b, full)}
                rows.append(row)
                print(f"[networks] {rows[-1]}", flush=True)
        del runners, refs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_cpp(args, plan_args: list[str], ids: Path, png: Path, graphs: bool = True) -> dict:
    cmd = [args.cpp_bin, "--engines", args.engines, "--model", args.model, "--ids", str(ids), *plan_args,
           "--seed", str(args.seed), "--device", args.device, "--repeats", str(args.repeats + 1), "--output", str(png),
           *([] if graphs else ["--no-graphs"])]
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"mf-generate-cpp exited {r.returncode}: {r.stderr[-2000:]}")
    load_s, times = parse_cpp_output(r.stdout)
    return {"median_s": statistics.median(times[1:]) if len(times) > 1 else times[0], "all_s": times[1:],
            "first_run_s": times[0], "engine_load_s": load_s, "process_wall_s": wall, "command": " ".join(map(str, cmd)),
            **parse_cpp_counters(r.stdout)}


def run(args) -> dict:
    from PIL import Image

    from megafusion.engine.load import open_engines
    from megafusion.core.loading import load_model, to_device
    from megafusion.core.plan import default_plan, parse_size, parse_stages, validate_plan
    from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
    from megafusion.runtime.tokens import format_ids

    dev = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if dev.type != "cuda":
        modes = [m for m in modes if m not in GPU_ONLY]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bundle = load_model(args.model, random_weights=True, seed=args.weights_seed)  # as mf-build-engines loads it
    load_s = time.perf_counter() - t0
    w, h = parse_size(args.size) if args.size else (None, None)
    plan = (validate_plan(bundle.family, parse_stages(args.stages), w, h) if args.stages
            else default_plan(bundle.family, w, h))
    plan_args = ["--stages", ",".join(str(s) for s in plan.stages)]
    opts = GenerationOptions(args.prompt, seed=args.seed)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    report = {"gpu": gpu, "torch": torch.__version__, "model": args.model, "plan": plan.describe(),
              "engines": str(args.engines), "repeats": args.repeats, "model_load_s": load_s, "modes": {}}
    print(f"{gpu}  torch {torch.__version__}  plan {plan.describe()}", flush=True)
    images: dict[str, np.ndarray] = {}

    latents: dict[str, torch.Tensor] = {}

    def record(mode: str, entry: dict, image: np.ndarray | None, latent: torch.Tensor | None = None) -> None:
        if latent is not None:
            latents[mode] = latent.detach().float().cpu()
        if image is not None:
            images[mode] = image
            if "cpp" in images and mode != "cpp":
                entry["image_diff_vs_cpp"] = image_diff(image, images["cpp"])
        report["modes"][mode] = entry
        counters = (f" captures {entry['captures']} replays {entry['replays']}" if "captures" in entry else "")
        print(f"[{mode}] median {entry['median_s']:.3f} s (all {', '.join(f'{t:.3f}' for t in entry['all_s'])}; "
              f"first {entry['first_run_s']:.2f} s){counters} {entry.get('image_diff_vs_cpp', '')}", flush=True)
        _save(report, out)

    if "networks" in modes:
        report["networks"] = check_networks(args.engines, bundle, plan, dev)
        _save(report, out)
    if "cpp" in modes:
        ids, png = out / "ids.txt", out / "cpp.png"
        ids.write_text(format_ids(args.model, bundle.tokenizers, args.prompt))
        entry = run_cpp(args, plan_args, ids, png)
        record("cpp", entry, np.asarray(Image.open(png).convert("RGB")))
    if "cpp-no-graphs" in modes:
        ids, png = out / "ids.txt", out / "cpp-no-graphs.png"
        ids.write_text(format_ids(args.model, bundle.tokenizers, args.prompt))
        entry = run_cpp(args, plan_args, ids, png, graphs=False)
        record("cpp-no-graphs", entry, np.asarray(Image.open(png).convert("RGB")))
    if "python-aoti" in modes or "python-aoti-graphs" in modes:
        t0 = time.perf_counter()
        nets, desc = open_engines(args.engines, bundle, plan, device=dev, backend="aoti")
        open_s = time.perf_counter() - t0
        for mode in ("python-aoti", "python-aoti-graphs"):
            if mode not in modes:
                continue
            pipe = (MegaFusionPipeline(bundle, nets, dev) if mode == "python-aoti"
                    else MegaFusionPipeline.fast(bundle, nets, dev))
            entry, res = time_pipeline(pipe, plan, opts, args.repeats, dev)
            entry["engines"], entry["engine_open_s"] = desc, open_s
            if pipe.graphs is not None:
                entry["captures"], entry["replays"] = pipe.graphs.captures, pipe.graphs.replays
            record(mode, entry, res.image, res.latent)
            del pipe, res
        del nets
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    if "python-eager" in modes or "python-compiled" in modes:
        # the same weights, as the engines hold them
        to_device(bundle, dev, torch.float16 if dev.type == "cuda" else torch.float32)
    if "python-eager" in modes:
        from megafusion.engine.networks import TorchNetworks

        from megafusion.cli.common import DTYPES
        from megafusion.core.specs import default_vae_precision

        # The VAE in the precision the engines hold it in (SDXL's bf16 on a GPU), as mf-generate runs it
        vae = DTYPES[default_vae_precision(bundle.family, "fp16" if dev.type == "cuda" else "fp32",
                                           bf16=dev.type == "cuda")]
        nets = TorchNetworks(bundle, vae)
        eager = MegaFusionPipeline(bundle, nets, dev)
        entry, res = time_pipeline(eager, plan, opts, args.repeats, dev)
        record("python-eager", entry, res.image, res.latent)
        with torch.inference_mode():  # the engines' latents through eager's decode: the denoising's share alone
            for mode in [m for m in latents if m != "python-eager"]:
                report["modes"][mode]["image_diff_vs_eager_eager_decode"] = image_diff(
                    eager.decode_image(latents[mode].to(dev), plan), res.image)
        _save(report, out)
        if "python-eager-alt-attention" in modes:
            ctx, allowed = other_attention(dev)
            with ctx:
                entry, alt = time_pipeline(eager, plan, opts, args.repeats, dev)
            entry["attention_backends"] = allowed
            with torch.inference_mode():
                entry["image_diff_vs_eager_eager_decode"] = image_diff(eager.decode_image(alt.latent.to(dev), plan),
                                                                       res.image)
            record("python-eager-alt-attention", entry, alt.image, alt.latent)
            del alt
    if "python-compiled" in modes:
        from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks

        pipe = MegaFusionPipeline.fast(bundle, FastTorchNetworks(bundle, FastOptions(), torch.float16), dev)
        entry, res = time_pipeline(pipe, plan, opts, args.repeats, dev)
        entry["note"] = "first run includes torch.compile of every shape"
        record("python-compiled", entry, res.image, res.latent)
        del pipe, res
    if "python-eager-fp32" in modes:  # last: it casts the shared modules to float32 in place
        from megafusion.engine.networks import TorchNetworks

        to_device(bundle, dev, torch.float32)
        with no_tf32():
            entry, res = time_pipeline(MegaFusionPipeline(bundle, TorchNetworks(bundle, torch.float32), dev), plan,
                                       opts, args.repeats, dev)
        entry["note"] = "float32 modules, TF32 off: the 16-bit eager image's own distance from full precision"
        record("python-eager-fp32", entry, res.image, res.latent)
    base = report["modes"].get("cpp", {}).get("median_s")
    for e in report["modes"].values():
        if base:
            e["ratio_to_cpp"] = e["median_s"] / base
    if "python-eager" in images:  # #15's image check: every path against the torch modules run eagerly
        for mode, image in images.items():
            if mode != "python-eager":
                report["modes"][mode]["image_diff_vs_eager"] = image_diff(image, images["python-eager"])
                if mode in latents and "python-eager" in latents:
                    report["modes"][mode]["latent_rel_l2_vs_eager"] = rel_l2(latents[mode], latents["python-eager"])
    _save(report, out)
    return report


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _save(report: dict, out: Path) -> None:
    (out / "cpp_vs_python.json").write_text(json.dumps(provenance() | report, indent=2))
    lines = [f"# libmegafusion vs Python, {report['gpu']}, torch {report['torch']}", "", report["plan"], "",
             "| mode | median s | runs s | first run s | vs C++ | image vs C++ (max/mean levels) | image vs Python eager "
             "| final latent vs eager (rel L2) | its latent through eager's decode, vs eager | graphs captured/replayed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, e in report["modes"].items():
        d, q = e.get("image_diff_vs_cpp", {}), e.get("image_diff_vs_eager", {})
        v = e.get("image_diff_vs_eager_eager_decode", {})
        lines.append(f"| {mode} | {e['median_s']:.3f} | {' '.join(f'{t:.3f}' for t in e['all_s'])} | "
                     f"{e['first_run_s']:.2f} | {e.get('ratio_to_cpp', 1.0):.3f} | "
                     f"{d.get('max', '-')}/{d.get('mean', 0):.3f} | {q.get('max', '-')}/{q.get('mean', 0):.3f} | "
                     f"{_g(e.get('latent_rel_l2_vs_eager'))} | {v.get('max', '-')}/{v.get('mean', 0):.3f} | "
                     f"{str(e['captures']) + '/' + str(e['replays']) if 'captures' in e else '-'} |")
    if report.get("networks"):
        lines += ["", "Each package against its torch module, same inputs:", "",
                  "| network | size | output | max abs diff | relative to max abs | relative L2 | package vs fp32 "
                  "(rel L2) | module vs fp32 (rel L2) |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['network']} | {r['size']} | {r['output']} | {r['max_abs']:.3g} | {r['rel']:.3g} | "
                  f"{_g(r.get('rel_l2'))} | {_g(r.get('package_vs_fp32_rel_l2'))} | {_g(r.get('module_vs_fp32_rel_l2'))} |"
                  for r in report["networks"]]
    (out / "cpp_vs_python.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/cpp_vs_python.py")
    p.add_argument("--model", default="sdxl")
    p.add_argument("--engines", required=True, help="folder of mf-build-engines --backend aoti")
    p.add_argument("--cpp-bin", help="the mf-generate-cpp executable (for the cpp modes)")
    p.add_argument("--output", required=True)
    p.add_argument("--size")
    p.add_argument("--stages")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="generation seed")
    p.add_argument("--weights-seed", type=int, default=0, help="the --weights-seed the engines were built with")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt", default="a photo of a red fox in the snow, highly detailed")
    args = p.parse_args(argv)
    modes = set(args.modes.split(","))
    if args.cpp_bin is None and {"cpp", "cpp-no-graphs"} & modes:
        p.error("--modes cpp and cpp-no-graphs need --cpp-bin")
    if "python-eager-alt-attention" in modes and "python-eager" not in modes:
        p.error("--modes python-eager-alt-attention runs beside python-eager: add it")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
