"""Inputs for `mf-bench --lora --controlnet --image` runs without downloads: a random LoRA on the family's UNet
attention projections (diffusers format, found from the config on the meta device: no weights needed), a control
image and a photo (random PNGs of the given size).

python benchmarks/lab/condition_inputs.py --model sdxl --rank 16 --size 1024x1024 --output DIR
  writes DIR/lora.safetensors, DIR/control.png, DIR/photo.png (the ControlNet: controlnet_bench.py --save-controlnet)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(family, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**family.unet)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in unet.named_modules():
        if name.endswith(TARGETS) and isinstance(m, torch.nn.Linear):
            out[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.02
            out[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.02
    return out


def main() -> None:
    from PIL import Image
    from safetensors.torch import save_file

    from megafusion.core.families import get_family
    from megafusion.core.plan import parse_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", default="1024x1024", help="of the control image and the photo")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lora = random_lora(get_family(args.model), args.rank)
    save_file({k: v.contiguous().half() for k, v in lora.items()}, str(out / "lora.safetensors"))
    w, h = parse_size(args.size)
    rng = np.random.default_rng(0)
    for name in ("control.png", "photo.png"):
        small = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)  # blocks: an image with structure
        Image.fromarray(small).resize((w, h), Image.NEAREST).save(out / name)
    print(f"wrote {out}/lora.safetensors ({len(lora) // 2} layers, rank {args.rank}), control.png, photo.png")


if __name__ == "__main__":
    main()
