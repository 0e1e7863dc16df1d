"""Small helpers several test files share: a test picture, a relative error, random LoRA files."""
from __future__ import annotations

import torch


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def photo(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth test picture in [-1, 1] (random weights make any picture as good as another)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, 4, 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def random_lora(layers, rank: int, seed: int = 0) -> dict:
    """{(network, module name): (down, up)}: random rank-`rank` matrices for each (network, name, Linear) of
    `layers`, drawn in that order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return {(net, name): (torch.randn(rank, m.in_features, generator=g) * 0.3,
                          torch.randn(m.out_features, rank, generator=g) * 0.3)
            for net, name, m in layers}


def save_lora_file(lora: dict, path, metadata: dict | None = None):
    """`lora` saved with safetensors in the layout diffusers' `save_lora_weights` writes."""
    from safetensors.torch import save_file

    save_file({f"{net}.{name}.{part}.weight": t.contiguous() for (net, name), (down, up) in lora.items()
               for part, t in (("lora_A", down), ("lora_B", up))}, str(path), metadata=metadata)
    return path
