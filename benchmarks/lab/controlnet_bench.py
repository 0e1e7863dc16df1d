"""The plan with one ControlNet beside the plain plan, one GPU: time, peak memory and cost.

python benchmarks/lab/controlnet_bench.py --model sdxl --modes graphs,compiled --output DIR
python benchmarks/lab/controlnet_bench.py --model sdxl --modes aoti --engines ENG --controlnet-dir CN --output DIR
  (aoti: packages from `mf-build-engines --controlnet CN`, CN from `--save-controlnet CN`; benchmarks/gpu/controlnet_h200.sh)

Random weights (fp16): the ControlNet is `ControlNetModel.from_unet` of the UNet with random output convolutions,
so its residuals are not zero and it costs what a real full-size ControlNet costs. Each mode runs the plain plan
and the ControlNet plan once to warm up (capture, compile), then `--repeats` times; the median is reported. The
graphed ControlNet image is compared with the eager one (same seed). Writes controlnet.json and controlnet.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from megafusion.benchmarks.timing import provenance
from megafusion.core.loading import load_model
from megafusion.core.plan import default_plan, parse_size
from megafusion.core.specs import default_dtype, default_vae_dtype
from megafusion.engine.networks import TorchNetworks
from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks
from megafusion.runtime.controlnet import Control, ControlledNetworks
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline


def random_controlnet(unet, seed: int = 0):
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return net


def controlnet_tflop(cnet, unet, plan, cfg: bool, vs: int, text_dim: int, device, dtype) -> float:
    """True FLOPs (FlopCounterMode, 2 per MAC) of the ControlNet over the plan's steps."""
    from torch.utils.flop_counter import FlopCounterMode

    total, batch = 0.0, 2 if cfg else 1
    for s in plan.stages:
        z = torch.zeros(batch, 4, s.height // vs, s.width // vs, device=device, dtype=dtype)
        img = torch.zeros(batch, 3, s.height, s.width, device=device, dtype=dtype)
        hs = torch.zeros(batch, 77, text_dim, device=device, dtype=dtype)
        added = None
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                     "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            cnet(z, torch.tensor(500, device=device), encoder_hidden_states=hs, controlnet_cond=img,
                 added_cond_kwargs=added, return_dict=False)
        total += s.steps * fc.get_total_flops()
    return total / 1e12


def _timed(pipe, plan, opts, repeats):
    pipe.generate(plan, opts)  # warm-up: capture / compile
    times, result = [], None
    for _ in range(repeats):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = pipe.generate(plan, opts)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _engine_mode(args, backend, plan, opts, image, dev, ref) -> dict:
    """aoti (or onnxruntime): the plan's engines and the ControlNet's (mf-build-engines --controlnet into
    --engines), against the same engines without it; CUDA-graphed where the engines are capturable (aoti: the
    ControlNet and UNet packages in one step graph)."""
    from megafusion.engine.controlnet_engines import open_controlnet_runners
    from megafusion.engine.load import open_engines
    from megafusion.runtime.controlnet import EngineControlledNetworks, load_controlnet

    cpu = load_model(args.model, random_weights=True)  # fp32 on the CPU: what the engine keys hashed
    t0 = time.perf_counter()
    base, desc = open_engines(args.engines, cpu, plan, 2, device=dev, backend=backend)
    cn = load_controlnet(args.controlnet_dir, cpu.unet, "cpu", torch.float32)
    precision = "fp16" if base.unet_dtype == torch.float16 else "fp32"
    nets, unets = open_controlnet_runners(args.engines, cpu, plan, [cn], [args.controlnet_dir], backend, precision, 2,
                                          dev, base.weights.get("unet"))
    opened_s = time.perf_counter() - t0
    make = MegaFusionPipeline.fast if base.capturable else MegaFusionPipeline
    plain_s, _ = _timed(make(cpu, base, dev), plan, opts, args.repeats)
    controlled = EngineControlledNetworks(base, cpu, [Control(cn, image, scale=args.scale)], dev, nets, unets)
    pipe = make(cpu, controlled, dev)
    ctl_s, res = _timed(pipe, plan, opts, args.repeats)
    return {"plain_s": plain_s, "controlnet_s": ctl_s, "ratio": ctl_s / plain_s, "engines": desc,
            "open_s": opened_s, "graph_captures": pipe.graphs.captures if pipe.graphs is not None else None,
            "peak_gib": (res.peak_memory_bytes or 0) / 2**30, "timings": res.timings,
            "mean_abs_diff_vs_eager_levels": float(np.abs(res.image.astype(np.int16) - ref).mean())}


def save_controlnet(model: str, path: str) -> None:
    """The benchmark's random ControlNet (as `run` makes it), saved for mf-build-engines --controlnet."""
    random_controlnet(load_model(model, random_weights=True).unet).save_pretrained(path)


def run(args) -> dict:
    dev = torch.device(args.device)
    dtype = default_dtype(dev)
    bundle = load_model(args.model, random_weights=True, device=dev, dtype=dtype)
    cnet = random_controlnet(load_model(args.model, random_weights=True).unet).to(dev, dtype).eval()
    w, h = parse_size(args.size) if args.size else (None, None)
    plan = default_plan(bundle.family, w, h, args.steps)
    opts = GenerationOptions(args.prompt, seed=args.seed)
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.interpolate(torch.rand((1, 3, 8, 8), generator=g), size=(1024, 1024), mode="bicubic",
                                           align_corners=False).clamp(0, 1)
    control = Control(cnet, image, scale=args.scale)
    vae = default_vae_dtype(bundle.family, bundle.vae.config, dtype, dev)
    report = {"plan": plan.describe(), "model": args.model, "provenance": provenance(), "modes": {}}
    eager = MegaFusionPipeline(bundle, ControlledNetworks(TorchNetworks(bundle, vae), [control], dev), dev)
    ref = eager.generate(plan, opts).image.astype(np.int16)
    for mode in args.modes.split(","):
        if mode in ("aoti", "onnxruntime"):
            report["modes"][mode] = _engine_mode(args, mode, plan, opts, image, dev, ref)
            print(mode, json.dumps(report["modes"][mode]["ratio"]), flush=True)
            continue
        base = TorchNetworks(bundle, vae) if mode == "graphs" else FastTorchNetworks(bundle, FastOptions(), vae)
        plain_s, _ = _timed(MegaFusionPipeline.fast(bundle, base, dev), plan, opts, args.repeats)
        ctl = MegaFusionPipeline.fast(bundle, ControlledNetworks(base, [control], dev), dev)
        ctl_s, res = _timed(ctl, plan, opts, args.repeats)
        report["modes"][mode] = {
            "plain_s": plain_s, "controlnet_s": ctl_s, "ratio": ctl_s / plain_s,
            "peak_gib": (res.peak_memory_bytes or 0) / 2**30, "timings": res.timings,
            "mean_abs_diff_vs_eager_levels": float(np.abs(res.image.astype(np.int16) - ref).mean()),
        }
        print(mode, json.dumps(report["modes"][mode]["ratio"]), flush=True)
    text_dim = bundle.unet.config.cross_attention_dim
    report["controlnet_tflop"] = controlnet_tflop(cnet, bundle.unet, plan, True, bundle.family.vae_scale, text_dim,
                                                  dev, dtype)
    return report


def main():
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/controlnet_bench.py")
    p.add_argument("--model", default="sdxl")
    p.add_argument("--size", help="output WIDTHxHEIGHT (default: the paper's plan)")
    p.add_argument("--modes", default="graphs,compiled")
    p.add_argument("--steps", type=int, help="total steps of the default plan (default 50)")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda (cpu runs the graphs mode eagerly: a smoke test)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", help="aoti mode: the folder mf-build-engines --controlnet built")
    p.add_argument("--controlnet-dir", help="aoti mode: the ControlNet --save-controlnet wrote")
    p.add_argument("--save-controlnet", metavar="DIR", help="write the random ControlNet there and stop")
    p.add_argument("--output")
    args = p.parse_args()
    if args.save_controlnet:
        save_controlnet(args.model, args.save_controlnet)
        return
    if not args.output:
        p.error("--output is required")
    if {"aoti", "onnxruntime"} & set(args.modes.split(",")) and not (args.engines and args.controlnet_dir):
        p.error("--modes aoti / onnxruntime need --engines and --controlnet-dir")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    (out / "controlnet.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# {args.model} {report['plan']}, one ControlNet", "",
             f"ControlNet cost over the plan: {report['controlnet_tflop']:,.3f} TFLOP", "",
             "| mode | plain s | ControlNet s | ratio | peak GiB | image vs eager (levels) |", "|---|---|---|---|---|---|"]
    for mode, r in report["modes"].items():
        lines.append(f"| {mode} | {r['plain_s']:.2f} | {r['controlnet_s']:.2f} | {r['ratio']:.2f} | "
                     f"{r['peak_gib']:.1f} | {r['mean_abs_diff_vs_eager_levels']:.2f} |")
    (out / "controlnet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
