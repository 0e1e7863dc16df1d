"""How the FP8 activations' scale granularity moves eps (issue #20): one scale per token, computed on every call
(engine/fp8.py today), against one per tensor computed on every call, and one per tensor fixed in advance from
calibration runs (static: no amax reduction left on the GPU, the quantization a pointwise multiply and cast that
can fuse into the op before it, and `_scaled_mm`'s tensor-wise scaling, which also writes fp16).

python3 benchmarks/lab/fp8_act_scales.py --model sd15 --output DIR [--size 512x512] [--margin 1.0]
    [--timesteps 999,601,201,21] [--calibration-timesteps 981,801,501,301,101,1]

The default `Fp8Policy`'s layers, emulated in float32 (weights quantized per output channel as engine/fp8.py does,
activations quantized to e4m3 and back with the scheme's scale, the product in float32), float32 around them, at
the model's native stage (no dilation; random weights unless --model-path). The static scale of a layer is the
largest input magnitude it saw in calibration, times --margin, over 448: calibration runs another prompt and
noise seed at other timesteps than the measured ones, so the figure includes what a fixed scale misses on
inputs it was not calibrated on (values beyond it saturate at 448). eps relative L2 against float32, per
timestep and the max. CPU only. Writes DIR/fp8-act-scales-<model>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from megafusion.benchmarks.timing import provenance
from megafusion.core.loading import load_model
from megafusion.engine.fp8 import FP8, FP8_MAX, Fp8Policy, dequantize_rows, fp8_candidates, quantize_rows
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.conditioning import encode

from fp8_unet import TIMESTEPS, relerr

SCHEMES = ("row", "tensor", "static")
CALIBRATION = {"prompt": "a watercolor painting of a fox in a snowy forest", "seed": 1}
"""Not the measured prompt or seed."""
CALIBRATION_TIMESTEPS = (981, 801, 501, 301, 101, 1)
"""Not the measured timesteps (TIMESTEPS)."""


class EmulatedFp8Linear(nn.Module):
    """A linear layer with e4m3 weights (per output channel) and e4m3 activations under `scheme`, in float32."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        # e4m3 kept, float32 only per call: a float32 copy of SDXL's 560 layers would not fit beside its UNet here.
        self.weight_fp8, self.weight_scale = quantize_rows(layer.weight.detach().float())
        self.bias = None if layer.bias is None else layer.bias.detach().float()
        self.scheme = "row"
        self.static_amax = 0.0
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.calibrating:
            self.static_amax = max(self.static_amax, float(x2.abs().max()))
        if self.scheme == "row":
            xd = dequantize_rows(*quantize_rows(x2))
        else:
            amax = self.static_amax if self.scheme == "static" else float(x2.abs().max())
            s = max(amax, 1e-12) / FP8_MAX
            xd = (x2 / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s
        y = xd @ dequantize_rows(self.weight_fp8, self.weight_scale).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def swap(unet: nn.Module, names: list[str], new: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Puts new[name] in place of each of `names`; returns what was there."""
    old = {}
    for n in names:
        parent, _, child = n.rpartition(".")
        p = unet.get_submodule(parent) if parent else unet
        old[n] = getattr(p, child)
        setattr(p, child, new[n])
    return old


def run(args) -> dict:
    t0 = time.perf_counter()
    dev = torch.device("cpu")
    bundle = load_model(args.model, args.model_path, random_weights=args.model_path is None, device=dev,
                        dtype=torch.float32, seed=args.weights_seed)
    fam = bundle.family
    width, height = (int(v) for v in (args.size or f"{fam.native_width}x{fam.native_height}").split("x"))
    nets = TorchNetworks(bundle)
    unet = bundle.unet
    names = fp8_candidates(unet, Fp8Policy())
    if any(not isinstance(unet.get_submodule(n), nn.Linear) for n in names):
        raise SystemExit("fp8_act_scales.py: the policy holds convolutions; this emulation covers linear layers")
    lat = (height // fam.vae_scale, width // fam.vae_scale)

    def inputs(prompt: str, seed: int):
        cond = encode(nets, bundle, prompt, "", 7.0, dev)
        x = torch.randn(cond.batch, 4, *lat, generator=torch.Generator("cpu").manual_seed(seed))
        return x, (cond.hidden_states, cond.pooled, cond.time_ids(height, width), 1)

    def eps(x, rest, t: int) -> torch.Tensor:
        with torch.inference_mode():
            return nets.unet(x, torch.tensor(t), *rest)

    timesteps = [int(t) for t in args.timesteps.split(",")]
    calibration = [int(t) for t in args.calibration_timesteps.split(",")]
    x, rest = inputs(args.prompt, args.seed)
    ref = {t: eps(x, rest, t) for t in timesteps}
    emu = {n: EmulatedFp8Linear(unet.get_submodule(n)) for n in names}
    kept = swap(unet, names, emu)
    report = {"model": args.model, "weights": bundle.source, "size": f"{width}x{height}", "layers": len(names),
              "timesteps": timesteps, "calibration": {**CALIBRATION, "timesteps": calibration},
              "margin": args.margin, "rows": [], **provenance()}
    try:
        cx, crest = inputs(CALIBRATION["prompt"], CALIBRATION["seed"])
        for m in emu.values():
            m.calibrating = True
        for t in calibration:
            eps(cx, crest, t)
        for m in emu.values():
            m.calibrating, m.static_amax = False, m.static_amax * args.margin
        for scheme in SCHEMES:
            for m in emu.values():
                m.scheme = scheme
            errs = [relerr(eps(x, rest, t), ref[t]) for t in timesteps]
            report["rows"].append({"scheme": scheme, "rel_l2_per_timestep": errs, "rel_l2_max": max(errs)})
            print(f"  {scheme:>6}: eps rel L2 vs float32 max {max(errs):.4f} ({', '.join(f'{e:.4f}' for e in errs)})",
                  flush=True)
    finally:
        swap(unet, names, kept)
    report["restored"] = bool(torch.equal(eps(x, rest, timesteps[0]), ref[timesteps[0]]))
    if not report["restored"]:
        raise SystemExit("fp8_act_scales.py: the float32 UNet did not come back after the FP8 variants")
    report["wall_s"] = time.perf_counter() - t0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fp8-act-scales-{args.model}.json").write_text(json.dumps(report, indent=1))
    (out / f"fp8-act-scales-{args.model}.md").write_text(table(report))
    print(table(report))
    return report


def table(report: dict) -> str:
    what = {"row": "per token, every call (engine/fp8.py)", "tensor": "per tensor, every call",
            "static": f"per tensor, calibrated (x{report['margin']:g})"}
    lines = [f"# FP8 activation scales, {report['model']} {report['size']}, {report['layers']} layers, against float32",
             "", f"timesteps {report['timesteps']}; calibration {report['calibration']}; float32 around the FP8 "
                 f"layers, emulated; commit {report.get('commit')}", "",
             "| activation scale | eps rel L2 vs float32, max over t | per timestep |", "|---|---:|---|"]
    for r in report["rows"]:
        per_t = ", ".join(f"{e:.4f}" for e in r["rel_l2_per_timestep"])
        lines.append(f"| {what[r['scheme']]} | {r['rel_l2_max']:.4f} | {per_t} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/fp8_act_scales.py")
    p.add_argument("--model", default="sd15", help="sd15, sdxl (random weights), or a tiny model")
    p.add_argument("--model-path", help="a local diffusers folder (real weights) instead of random weights")
    p.add_argument("--size", help="WxH (default: the model's native size)")
    p.add_argument("--margin", type=float, default=1.0, help="static scale = calibrated amax x margin / 448")
    p.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)), help="where eps is measured")
    p.add_argument("--calibration-timesteps", default=",".join(map(str, CALIBRATION_TIMESTEPS)),
                   help="where the static scales are calibrated (another prompt and noise seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-seed", type=int, default=0)
    p.add_argument("--prompt", default="a photo of a lighthouse on a cliff at dusk, highly detailed")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    if args.size and not (args.size.count("x") == 1 and all(v.isdigit() for v in args.size.split("x"))):
        p.error(f"--size {args.size}: give WxH, for example 512x512")
    for flag, v in (("--timesteps", args.timesteps), ("--calibration-timesteps", args.calibration_timesteps)):
        if not all(t.strip().isdigit() and int(t) < 1000 for t in v.split(",")):
            p.error(f"{flag} {v}: give timesteps in [0, 999], comma-separated")
    if not args.margin > 0:
        p.error(f"--margin {args.margin}: must be positive")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
