"""GPU measurement: real-size random-weight export, and ONNX Runtime's CUDA EP beside torch.

python benchmarks/lab/ort_gpu.py --output DIR [--model sdxl] [--skip-sd15-export] [--cuda-graph] ...

Steps, each guarded (an error is recorded in DIR/ort_gpu.json and the next step runs), results rewritten
after every step:
  1. load the model (random weights, CUDA, fp16);
  2. export + build its default plan's engines with the project's own build (`build_engines`, onnxruntime,
     fp16, exported from the CUDA fp16 modules) and record each network's export time and file sizes;
  3. open them with the CUDA EP (`open_engines`);
  4. one whole MegaFusion generation (default plan, seed 0) through torch and through ORT, times and the
     largest image / latent difference (if the all-ORT run fails, once more with the torch VAE);
  5. the UNet alone at every stage size (batch 2, CUDA events, median) through ORT and the torch module on
     the same inputs, with the eps difference (after the generation: see `run`);
  6. optionally the standard UNet through ORT CUDA graphs;
  7. SD1.5's default-plan export (times and sizes) unless --skip-sd15-export.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ort_gpu_report import Report, cuda_problem, export_rows, image_diff, parse_args, tensor_diff, time_summary
from megafusion.benchmarks.timing import environment, time_call

DEV = torch.device("cuda")
"""Where everything runs; the CPU smoke test swaps in the CPU (CPU EP, same code path otherwise)."""


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def load(name: str, seed: int, st: dict[str, Any]):
    from megafusion.core.loading import load_model
    from megafusion.core.plan import default_plan

    t0 = time.perf_counter()
    # As `mf-build-engines --random-weights --weights-seed N` loads it (CPU, fp32): the same weights and fingerprints,
    # so engines built by separate (parallel) mf-build-engines processes open here; `to_device` follows.
    bundle = load_model(name, random_weights=True, seed=seed)
    st["model_load_s"] = round(time.perf_counter() - t0, 2)
    plan = default_plan(bundle.family)
    st["plan"] = plan.describe()
    return bundle, plan


def to_device(bundle) -> None:
    """The bundle on DEV in fp16 (the engines' precision) for the torch runs, once the engines are opened (they
    hashed it as loaded)."""
    from megafusion.core.loading import to_device as move

    move(bundle, DEV, torch.float16)


def export(bundle, plan, engine_dir: Path, args, st: dict[str, Any], report: Report) -> None:
    """The project's build path, as `mf-build-engines --backend onnxruntime --precision fp16` runs it."""
    from megafusion.engine.build import BuildRequest, build_engines

    st["engine_dir"], st["log"] = str(engine_dir), []

    def log(msg: str) -> None:  # the raw log is saved line by line: a timeout still shows what finished
        print(msg, flush=True)
        st["log"].append(msg)
        report.save()

    fuse = args.ort_optimize or ("cuda" if DEV.type == "cuda" else "none")
    st["ort_optimize"] = fuse
    req = BuildRequest(plan, "onnxruntime", "fp16", engine_dir, args.vae_precision, 2, str(DEV), args.force,
                       check_load=args.check_load, ort_optimize=fuse)
    built = build_engines(bundle, req, log=log)
    st["rows"] = export_rows(built, bundle.family.vae_scale)


def open_ort(bundle, plan, engine_dir: Path, st: dict[str, Any], args=None):
    from megafusion.engine.load import open_engines

    t0 = time.perf_counter()
    nets, desc = open_engines(engine_dir, bundle, plan, 2, "pixel", DEV, "onnxruntime", "fp16",
                              getattr(args, "conv_algo_search", "EXHAUSTIVE"),
                              getattr(args, "generation_unet_graphs", False))
    st["open_s"] = round(time.perf_counter() - t0, 2)  # sha256 of every file + one CUDA-EP session each
    st["description"] = desc
    st["providers"] = {f"{n}/{d}": r.session.get_providers() for (n, d), r in nets.runners.items()}
    return nets


def _unet_cases(plan, vae_scale: int) -> list[tuple[str, int, int, int]]:
    """(label, latent h, latent w, dilation): standard at every stage size, dilated where later stages run it."""
    cases, seen = [], set()
    for k, s in enumerate(plan.stages):
        h, w = s.height // vae_scale, s.width // vae_scale
        for d in ((1,) if k == 0 else (1, 2)):
            if (h, w, d) not in seen:
                seen.add((h, w, d))
                cases.append((f"{s.width}x{s.height} {'standard' if d == 1 else 'dilated'}", h, w, d))
    return cases


def _timed(fn, warmup: int, iters: int):
    first, out = time_call(fn, DEV)
    for _ in range(warmup):
        fn()
    times = [time_call(fn, DEV)[0] for _ in range(iters)]
    return time_summary(times, first), out


def unet_latency(bundle, plan, nets, args, st: dict[str, Any], report: Report) -> None:
    from megafusion.core.dilation import mid_dilation
    from megafusion.core.wrappers import wrap

    st["batch"], st["cases"] = 2, []
    for label, h, w, d in _unet_cases(plan, bundle.family.vae_scale):
        runner = nets.runners[("unet", d)]
        spec = runner.spec
        feeds = {t.name: x.to(DEV) for t, x in
                 zip(spec.inputs, spec.sample_inputs(spec.axes(2, h, w, bundle.family.vae_scale), seed=args.seed))}
        case: dict[str, Any] = {"case": label, "latent": [h, w], "dilation": d}
        st["cases"].append(case)
        try:
            case["ort"], ort_out = _timed(lambda: runner.run(feeds)["eps"], args.unet_warmup, args.unet_iters)
            report.save()
            wrapper = wrap(bundle.unet, spec, bundle.family.is_xl).eval()  # the module exactly as exported
            with torch.inference_mode(), mid_dilation(bundle.unet, d):
                case["torch"], ref = _timed(lambda: wrapper(*feeds.values()), args.unet_warmup, args.unet_iters)
            case["diff"] = tensor_diff(ort_out, ref)
            del ort_out, ref
        except Exception as e:  # noqa: BLE001 - one failing size (e.g. out of memory) must not hide the others
            case["error"] = f"{type(e).__name__}: {e}"[:2000]
        _free()
        report.save()
        print(f"   {case}", flush=True)


class HybridNetworks:
    """ORT UNet and text encoders with the torch VAE: the fallback when the all-ORT VAE fails at 2048 px."""

    def __init__(self, engines, torch_nets):
        self.engines, self.torch = engines, torch_nets
        self.unet_dtype, self.vae_dtype = engines.unet_dtype, torch_nets.vae_dtype
        self.capturable = False  # the ORT half cannot be captured

    def unet(self, *args, **kw):
        return self.engines.unet(*args, **kw)

    def encode_text(self, index, input_ids):
        return self.engines.encode_text(index, input_ids)

    def vae_decode(self, latents):
        return self.torch.vae_decode(latents)

    def vae_encode(self, images):
        return self.torch.vae_encode(images)


def generate(bundle, plan, nets, args, st: dict[str, Any]):
    """Warm-up, then `gen_repeats` timed generations; returns the last result."""
    from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

    pipe = MegaFusionPipeline(bundle, nets, device=DEV)
    opts = GenerationOptions(args.prompt, seed=args.seed)
    t0 = time.perf_counter()
    pipe.generate(plan, opts)
    st["first_s"] = time.perf_counter() - t0  # cuDNN searches at new shapes, arena growth
    runs = [pipe.generate(plan, opts) for _ in range(args.gen_repeats)]
    totals = [sum(s for _, s in r.timings) for r in runs]  # the pipeline synchronizes at every mark
    st["all_s"], st["median_s"] = totals, statistics.median(totals)
    st["segments_s"] = {name: statistics.median(r.timings[i][1] for r in runs)
                        for i, (name, _) in enumerate(runs[0].timings)}
    if runs[-1].peak_memory_bytes is not None:  # torch's allocator only, not ORT's arenas
        st["torch_peak_gib"] = runs[-1].peak_memory_bytes / 2**30
    return runs[-1]


def compare(st: dict[str, Any], ref, got) -> None:
    st["image"] = image_diff(got.image, ref.image)
    d = tensor_diff(got.latent, ref.latent)
    st["latent_relerr_l2"], st["latent_max_abs"] = d["relerr_l2"], d["max_abs"]


def cuda_graph_unet(bundle, plan, engine_dir: Path, nets, args, st: dict[str, Any]) -> None:
    """The standard UNet at stage 1's size through ORT CUDA graphs, on a side stream (capture needs one)."""
    from megafusion.engine.cache import EngineCache
    from megafusion.engine.onnxruntime_backend import OrtRunner

    entries = [e for e in EngineCache(engine_dir).entries().values() if e.key.network == "unet"
               and e.key.dilation == 1 and e.key.backend == "onnxruntime" and e.key.precision == "fp16"]
    entry = max(entries, key=lambda e: e.created)
    eager = nets.runners[("unet", 1)]
    vs, s = bundle.family.vae_scale, plan.stages[0]
    spec = eager.spec

    def feeds_for(seed: int) -> dict[str, torch.Tensor]:
        axes = spec.axes(2, s.height // vs, s.width // vs, vs)
        return {t.name: x.to(DEV) for t, x in zip(spec.inputs, spec.sample_inputs(axes, seed=seed))}

    feeds = feeds_for(args.seed)
    ref = eager.run(feeds)["eps"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the feeds were written on the default stream
    with torch.cuda.stream(stream):
        t0 = time.perf_counter()
        runner = OrtRunner(engine_dir / entry.files[0].path, spec, vs, DEV, cuda_graph=True)
        st["session_s"] = time.perf_counter() - t0
        st["case"] = f"{s.width}x{s.height} standard, batch 2"
        st["timing"], out = _timed(lambda: runner.run(feeds)["eps"], args.unet_warmup, args.unet_iters)
        st["diff_vs_ort_eager"] = tensor_diff(out, ref)
        # A replay on new inputs: the graph must read the static buffers the new values were copied into.
        feeds2 = feeds_for(args.seed + 1)
        out2 = runner.run(feeds2)["eps"]
        st["diff_new_inputs_vs_ort_eager"] = tensor_diff(out2, eager.run(feeds2)["eps"])
        st["diff_new_vs_first_output"] = tensor_diff(out2, out)
        st["graphs_captured"] = runner.graphs_captured


def _free() -> None:
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)
        torch.cuda.empty_cache()


def run(args, report: Report) -> None:
    import onnxruntime as ort

    from megafusion.engine.networks import TorchNetworks

    env = dataclasses.asdict(environment(DEV))
    env.update(onnxruntime=ort.__version__, onnxruntime_path=str(Path(ort.__file__).parent),
               ort_providers=ort.get_available_providers())
    report.data["environment"], report.data["args"] = env, vars(args)
    report.save()
    print(f"{env['device_name']}  torch {env['torch']}  onnxruntime {ort.__version__}", flush=True)
    engine_root = Path(args.engine_dir)
    m = args.model
    state: dict[str, Any] = {}  # every GPU-holding object, so one clear() releases them before SD1.5
    if not (args.skip_export and args.skip_unet and args.skip_generation):
        with report.guarded(f"load_{m}") as st:
            state["bundle"], state["plan"] = load(m, args.seed, st)
    bundle, plan = state.get("bundle"), state.get("plan")
    if bundle is not None and not args.skip_export:
        with report.guarded(f"export_{m}") as st:
            export(bundle, plan, engine_root / m, args, st, report)
    if bundle is not None and not (args.skip_unet and args.skip_generation):
        with report.guarded("open_engines_ort") as st:
            state["nets"] = open_ort(bundle, plan, engine_root / m, st, args)
    nets = state.get("nets")
    if bundle is not None:
        to_device(bundle)
    # The generation before the UNet timing: the standard UNet's session would otherwise keep an arena
    # sized for 2048 px (tens of GB) through the generation, which never runs it there.
    if nets is not None and not args.skip_generation:
        vae_dtype = {"fp16": torch.float16, "fp32": torch.float32}[nets.runners[("vae_decoder", 1)].spec.precision]
        results: dict[str, Any] = {}
        # torch first: its cache is emptied before ORT's sessions grow their arenas at 2048 px.
        with report.guarded("generate_torch") as st:
            st["vae_precision"] = str(vae_dtype)
            results["torch"] = generate(bundle, plan, TorchNetworks(bundle, vae_dtype), args, st)
        _free()
        with report.guarded("generate_onnxruntime") as st:
            results["ort"] = generate(bundle, plan, nets, args, st)
        _free()
        if "ort" not in results and not args.no_hybrid_fallback:
            with report.guarded("generate_onnxruntime_unet_torch_vae") as st:
                st["note"] = "ORT UNet and text encoders, torch VAE (the all-ORT run failed)"
                results["hybrid"] = generate(bundle, plan, HybridNetworks(nets, TorchNetworks(bundle, vae_dtype)),
                                             args, st)
            _free()
        for name in ("ort", "hybrid"):
            if name in results and "torch" in results:
                with report.guarded(f"difference_{name}_vs_torch") as st:
                    compare(st, results["torch"], results[name])
        results.clear()
    if nets is not None and not args.skip_unet:
        with report.guarded("unet_latency") as st:
            unet_latency(bundle, plan, nets, args, st, report)
    if nets is not None and args.cuda_graph:
        with report.guarded("unet_cuda_graph") as st:
            cuda_graph_unet(bundle, plan, engine_root / m, nets, args, st)
    state.clear()
    del bundle, plan, nets
    _free()
    extra = "tiny-sd15" if m.startswith("tiny") else "sd15"
    if "sd15" not in m and not args.skip_sd15_export:
        with report.guarded(f"load_{extra}") as st:
            state["bundle"], state["plan"] = load(extra, args.seed, st)
        if "bundle" in state:
            with report.guarded(f"export_{extra}") as st:
                export(state["bundle"], state["plan"], engine_root / extra, args, st, report)
        state.clear()
        _free()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(args.output)
    problem = cuda_problem()
    if problem is not None:
        report.data["fatal"] = problem
        report.save()
        print(f"ort_gpu: error: {problem}", file=sys.stderr)
        return 2
    run(args, report)
    report.data["finished"] = True
    report.save()
    print(f"results: {report.dir / 'ort_gpu.json'}, {report.dir / 'ort_gpu.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
