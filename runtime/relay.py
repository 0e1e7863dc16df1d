"""Truncate and relay between stages (docs/ALGORITHM.md §7-8).

Pixel relay (default): decode x0 / scaling, clamp to [-1, 1], bicubic resize (Keys a = -0.75, half-pixel
centres: `interpolate(mode="bicubic", align_corners=False)`), clamp, encode (posterior mean), times scaling.
Latent relay (optional fast path, not in the paper): bicubic-resize the x0 latent itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.networks import Networks
from .fused_relay import relay_resize

RELAY_MODES = ("pixel", "latent")


def bicubic_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)


def resize_clamped(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """clamp -> bicubic -> clamp: the pixel-space middle of the relay."""
    return bicubic_resize(image.clamp(-1.0, 1.0), height, width).clamp(-1.0, 1.0)


def relay(nets: Networks, x0: torch.Tensor, height: int, width: int, scaling: float, vae_scale: int,
          mode: str = "pixel") -> torch.Tensor:
    """x0 latent of stage k -> x0 latent at stage k+1's pixel size (height, width)."""
    if mode == "pixel":
        image = nets.vae_decode(x0 / scaling)
        # Fused clamp/resize/clamp/cast on CUDA (torch's resize_clamped elsewhere), straight to the encoder's dtype.
        return nets.vae_encode(relay_resize(image, height, width, nets.vae_dtype)) * scaling
    if mode == "latent":
        return bicubic_resize(x0, height // vae_scale, width // vae_scale)
    raise ValueError(f"unknown relay mode {mode!r}; choose one of {', '.join(RELAY_MODES)}")
