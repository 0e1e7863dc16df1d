"""How far apart two bf16 runs of one VAE decoder are, beside bf16's distance from full precision: the floor under
#15's "every package within 0.5% of its module" and "images within 2 levels of eager" where both sides decode in
bf16 (SDXL's VAE on CUDA, by default).

python3 benchmarks/lab/vae_bf16_spread.py --model sdxl --latent 32,64 --device cpu --output DIR
    [--variants fp32,bf16,bf16-cl,fp16,bf16-compiled] [--reference fp64|fp32] [--seed 0]

Only the model's VAE is built (the real architecture, random weights, `build_random`). It decodes one seeded latent
(N(0, 1) over the scaling factor, as a denoised latent enters the decoder) per size, in each variant:
`fp32`, `bf16` (NCHW), `bf16-cl` (channels_last: other kernels, so other summation orders, as a package's
Inductor kernels are to the module's), `fp16`, `bf16-compiled` (torch.compile's kernels, the nearest thing to a
package; minutes on a CPU). Every pair is compared as RESULTS.md's package tables are: the largest absolute difference
over the reference's largest absolute value, the relative L2, and the 8-bit images (the runtime's `to_uint8`), max
and mean levels apart. TF32 is off on CUDA. Writes vae_bf16_spread.json and .md, with provenance, after each size.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import torch

from megafusion.benchmarks.timing import provenance
from megafusion.engine.cache import atomic_write

VARIANTS = ("fp32", "bf16", "bf16-cl", "fp16", "bf16-compiled")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_vae(model: str, seed: int, device: torch.device):
    """The family's VAE alone, random weights drawn as `load_model(random_weights=True)` draws them."""
    from megafusion.core.families import get_family
    from megafusion.core.loading import build_random

    bundle = build_random(get_family(model), seed=seed, device=device,
                          skip=frozenset({"unet", "text_encoder", "text_encoder_2"}))
    return bundle.vae.eval().requires_grad_(False)


def seeded_latent(vae, side: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, vae.config.latent_channels, side, side, generator=g, dtype=torch.float64)
    return (z / vae.config.scaling_factor).to(device)


def decode(vae, z: torch.Tensor, variant: str) -> torch.Tensor:
    """`vae.decode(z)` in `variant`, returned in float64. A copy is cast: casting `vae` itself to 16 bits and back
    would leave its weights rounded for the variants after."""
    dtype = DTYPES[variant.split("-")[0]]
    m = copy.deepcopy(vae).to(dtype)
    x = z.to(dtype)
    if variant.endswith("-cl"):
        m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(m.decode) if variant.endswith("-compiled") else m.decode
    with torch.inference_mode():
        return run(x).sample.double()


def levels(image: torch.Tensor) -> torch.Tensor:
    from megafusion.runtime.pipeline import to_uint8

    return to_uint8(image).to(torch.int16)


def compare(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (a - b).abs()
    lv = (levels(a) - levels(b)).abs().double()
    return {"max_abs_over_ref_max": (d.max() / ref.abs().max()).item(), "rel_l2": ((a - b).norm() / ref.norm()).item(),
            "levels_max": int(lv.max()), "levels_mean": lv.mean().item()}


def spread(vae, side: int, variants: list[str], reference: str, seed: int, device: torch.device,
           say=print) -> dict:
    """Every variant's decode of one latent, and every pair's differences (the reference's row first)."""
    z = seeded_latent(vae, side, seed, device)
    outs, seconds = {}, {}
    for v in [reference] + variants:
        t0 = time.perf_counter()
        outs[v] = decode(vae, z, v)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[v] = time.perf_counter() - t0  # the compiled variant's includes its compiling
        say(f"  latent {side}x{side}: {v} decoded in {seconds[v]:.1f} s")
    ref = outs[reference]
    pairs = [{"a": a, "b": b, **compare(outs[a], outs[b], ref)} for a, b in itertools.combinations(outs, 2)]
    return {"latent": side, "image": side * vae_scale(vae), "seconds": seconds,
            "clamped_fraction": (ref.abs() > 1).double().mean().item(), "ref_max_abs": ref.abs().max().item(),
            "pairs": pairs}


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def table(result: dict) -> str:
    prov = result["provenance"]
    lines = [f"# VAE decoder: bf16 spread ({result['model']}, random weights seed {result['seed']}, "
             f"{result['device']})", "",
             f"{prov['date_utc']}, commit {prov['commit']}{' (dirty)' if prov['dirty'] else ''}, "
             f"torch {result['torch']}: `{prov['command']}`", "",
             "| image | a | b | max abs / ref max | rel L2 | levels max | levels mean |",
             "|---|---|---|---:|---:|---:|---:|"]
    for size in result["sizes"]:
        for p in size["pairs"]:
            lines.append(f"| {size['image']} | {p['a']} | {p['b']} | {p['max_abs_over_ref_max']:.3%} | "
                         f"{p['rel_l2']:.3%} | {p['levels_max']} | {p['levels_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/vae_bf16_spread.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--latent", default="32", help="latent sides, comma-separated (image side = latent x 8)")
    p.add_argument("--variants", default="fp32,bf16,bf16-cl,fp16")
    p.add_argument("--reference", choices=("fp64", "fp32"), default="fp64")
    p.add_argument("--seed", type=int, default=0, help="weights seed (the latent's is seed + 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants {','.join(bad)}: choose from {', '.join(VARIANTS)}")
    try:
        sides = [int(s) for s in args.latent.split(",")]
    except ValueError:
        p.error(f"--latent {args.latent}: give latent sides as integers, e.g. 32,64")
    variants = [v for v in variants if v != args.reference]
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 is float32
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    vae = build_vae(args.model, args.seed, device)
    result = {"model": args.model, "seed": args.seed, "device": str(device), "reference": args.reference,
              "torch": torch.__version__, "provenance": provenance(), "sizes": []}
    for side in sides:
        result["sizes"].append(spread(vae, side, variants, args.reference, args.seed + 1, device))
        atomic_write(out / "vae_bf16_spread.json", json.dumps(result, indent=1).encode())
        atomic_write(out / "vae_bf16_spread.md", table(result).encode())
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
