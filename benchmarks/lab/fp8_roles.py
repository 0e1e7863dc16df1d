"""Which UNet layer roles make the FP8 UNet's eps error (issue #20): one role in FP8 at a time, against float32.

python3 benchmarks/lab/fp8_roles.py --model sd15 --output DIR [--size 512x512] [--timesteps 999,601,201,21]

For the model's native stage (no dilation; random weights unless --model-path), at each timestep: eps of the
float32 UNet, of the UNet with only one role's layers in FP8 (engine/fp8.py's `Fp8Policy(roles=(role,))`,
swapped in place and back; the default policy's roles, and proj_in and proj_out, which it leaves out), and with
the default policy's layers; relative L2 against float32, max over the timesteps. The figures of
benchmarks/results/cpu-2026-12-03 are from before that default left proj_in and proj_out out (its row
"default policy" is all seven roles).
Around the FP8 layers the network stays float32, so the figures are FP8's own share (the GPU's FP8 UNet runs
in bf16 around them: bf16's own ~1.3-1.5% comes on top, in quadrature if independent).
Runs on the CPU only (torch's `_scaled_mm` has a CPU kernel): the real-size SD1.5 UNet at 512 takes about 10 s a
call on 2 cores, SDXL's at 512 about 40 s.
Writes DIR/fp8-roles-<model>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from megafusion.benchmarks.timing import provenance
from megafusion.core.loading import load_model
from megafusion.engine.fp8 import Fp8Policy, fp8_candidates, swap_in_fp8
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.conditioning import encode

from fp8_unet import TIMESTEPS, relerr

MEASURED = Fp8Policy().roles + tuple(r for r in ("proj_in", "proj_out") if r not in Fp8Policy().roles)
"""The default policy's roles and the two it leaves out for their error (engine/fp8.py's docstring)."""


def variants(unet: torch.nn.Module, policy: Fp8Policy) -> dict[str, tuple[str, ...]]:
    """Label -> roles in FP8: each of MEASURED that has layers in this UNet alone, then the policy's."""
    out = {}
    for role in MEASURED:
        if fp8_candidates(unet, Fp8Policy(roles=(role,))):
            out[role] = (role,)
    out["default policy"] = policy.roles
    return out


def run(args) -> dict:
    t0 = time.perf_counter()
    dev = torch.device(args.device)
    bundle = load_model(args.model, args.model_path, random_weights=args.model_path is None, device=dev,
                        dtype=torch.float32, seed=args.weights_seed)
    fam = bundle.family
    width, height = (int(v) for v in (args.size or f"{fam.native_width}x{fam.native_height}").split("x"))
    policy = Fp8Policy()
    nets32 = TorchNetworks(bundle)
    cond = encode(nets32, bundle, args.prompt, "", 7.0, dev)
    g = torch.Generator("cpu").manual_seed(args.seed)
    x = torch.randn(cond.batch, 4, height // fam.vae_scale, width // fam.vae_scale, generator=g).to(dev)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    args_of = (cond.hidden_states, cond.pooled, cond.time_ids(height, width), 1)
    with torch.inference_mode():
        ref = {t: nets32.unet(x, torch.tensor(t, device=dev), *args_of) for t in timesteps}
    report = {"model": args.model, "weights": bundle.source, "size": f"{width}x{height}", "device": str(dev),
              "torch": torch.__version__, "timesteps": timesteps, "rows": [], **provenance()}
    print(f"{args.model} {width}x{height} on {dev}: float32 reference in {time.perf_counter() - t0:.1f} s", flush=True)
    for label, roles in variants(bundle.unet, policy).items():
        # In place, the float layers put back after: no second UNet in memory (SDXL's is 10 GiB in float32).
        names = fp8_candidates(bundle.unet, Fp8Policy(roles=roles))
        kept = {n: bundle.unet.get_submodule(n) for n in names}
        swap_in_fp8(bundle.unet, names, policy.fast_accum, "UNet")
        try:
            with torch.inference_mode():
                errs = [relerr(nets32.unet(x, torch.tensor(t, device=dev), *args_of), ref[t]) for t in timesteps]
        finally:
            for n, layer in kept.items():
                parent, _, child = n.rpartition(".")
                setattr(bundle.unet.get_submodule(parent) if parent else bundle.unet, child, layer)
        row = {"variant": label, "roles": list(roles), "layers": len(names), "rel_l2_per_timestep": errs,
               "rel_l2_max": max(errs)}
        report["rows"].append(row)
        print(f"  {label:>16}: {len(names):3d} layers, eps rel L2 vs float32 max {max(errs):.4f} "
              f"({', '.join(f'{e:.4f}' for e in errs)})", flush=True)
    with torch.inference_mode():  # every float layer back in place: the reference again, bit for bit
        t = timesteps[0]
        report["restored"] = bool(torch.equal(nets32.unet(x, torch.tensor(t, device=dev), *args_of), ref[t]))
    if not report["restored"]:
        raise SystemExit("fp8_roles.py: the float32 UNet did not come back after the FP8 variants")
    report["wall_s"] = time.perf_counter() - t0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fp8-roles-{args.model}.json").write_text(json.dumps(report, indent=1))
    (out / f"fp8-roles-{args.model}.md").write_text(table(report))
    print(table(report))
    return report


def table(report: dict) -> str:
    lines = [f"# FP8 by layer role, {report['model']} {report['size']}, {report['device']}, against float32",
             "", f"timesteps {report['timesteps']}; float32 around the FP8 layers; commit {report.get('commit')}", "",
             "| roles in FP8 | layers | eps rel L2 vs float32, max over t |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['layers']} | {r['rel_l2_max']:.4f} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/fp8_roles.py")
    p.add_argument("--model", default="sd15", help="sd15, sdxl (random weights), or a tiny model")
    p.add_argument("--model-path", help="a local diffusers folder (real weights) instead of random weights")
    p.add_argument("--device", default="cpu",
                   help="cpu only (float32 around the FP8 layers: CUDA's FP8 GEMMs write bf16 only)")
    p.add_argument("--size", help="WxH (default: the model's native size)")
    p.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights-seed", type=int, default=0)
    p.add_argument("--prompt", default="a photo of a lighthouse on a cliff at dusk, highly detailed")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error(f"--device {args.device}: this measure runs on the cpu (float32 around the FP8 layers; on CUDA the "
                "FP8 GEMMs write bf16 only: benchmarks/lab/fp8_unet.py --roles measures a policy there)")
    if args.size and not (args.size.count("x") == 1 and all(v.isdigit() for v in args.size.split("x"))):
        p.error(f"--size {args.size}: give WxH, for example 512x512")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
