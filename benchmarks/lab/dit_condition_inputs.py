"""Inputs for `mf-bench --model sd3|flux --controlnet ... --image ...` without downloads: a ControlNet folder of
the published shapes with random weights (dit_controlnet_bench.py's `real_size_controlnet`: SD3, 6 joint blocks as
InstantX's SD3 ControlNets; FLUX, 5 double and 10 single blocks as InstantX's FLUX.1-dev ones), a control image
and a photo (random block PNGs of the given size).

python benchmarks/lab/dit_condition_inputs.py --model sd3 --size 1024x1024 --output DIR [--device cuda]
  writes DIR/controlnet/ (config.json + bf16 safetensors), DIR/control.png, DIR/photo.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from megafusion.core.families import get_family
    from megafusion.core.plan import parse_size

    sys.path.insert(0, str(Path(__file__).parent))  # lab scripts are files, not a package
    from dit_controlnet_bench import real_size_controlnet

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd3", choices=("sd3", "flux", "tiny-sd3", "tiny-flux"))
    p.add_argument("--size", default="1024x1024", help="of the control image and the photo")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: FLUX's is ~3B)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    net = real_size_controlnet(get_family(args.model), torch.device(args.device), torch.bfloat16)
    net.save_pretrained(str(out / "controlnet"))
    w, h = parse_size(args.size)
    rng = np.random.default_rng(0)
    for name in ("control.png", "photo.png"):
        small = rng.integers(0, 256, (max(h // 32, 1), max(w // 32, 1), 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.NEAREST).save(out / name)
    params = sum(t.numel() for t in net.parameters()) / 1e6
    print(f"wrote {out}/controlnet ({type(net).__name__}, {params:.0f}M parameters, bf16), control.png, photo.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
