"""The C++ preprocessing of the IP-Adapter image (cpp/src/lib/clip_image.cpp), replayed with the same ATen kernels
from Python, against transformers' CLIPImageProcessor (PIL): resizing the 8-bit image with torch's antialiased
bicubic keeps the pixel values within 2 levels of 255 (mean under 0.02 levels), where a float resize is up to 50
levels off on an upscale (PIL rounds and clips its 8-bit result). This bounds what tests/cpp/
test_libmegafusion_ip_image.py compares through the library; CPU, milliseconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


def _as_clip_image_cpp(rgb: np.ndarray, edge: int, crop: int, mean, std) -> torch.Tensor:
    """clip_image.cpp's steps: clip_steps' sizes, uint8 antialiased bicubic, crop, x / 255, normalize."""
    h, w = rgb.shape[:2]
    short, long = min(h, w), max(h, w)
    other = int(edge * long / short)
    rh, rw = (other, edge) if w <= h else (edge, other)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
    x = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (rh - crop) // 2, (rw - crop) // 2
    x = x[..., top:top + crop, left:left + crop].float() * (1 / 255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("side", [32, 224])
def test_pixels_within_two_levels_of_transformers(side):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    for h, w in ((40, 48), (48, 40), (17, 33), (480, 640), (1000, 750), (side, side), (300, 301)):
        rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = proc(Image.fromarray(rgb), return_tensors="pt").pixel_values
        got = _as_clip_image_cpp(rgb, side, side, proc.image_mean, proc.image_std)
        levels = (got - ref).abs() * std * 255
        assert got.shape == ref.shape == (1, 3, side, side)
        assert levels.max() <= 2.0 + 1e-3 and levels.mean() < 0.02, ((h, w), levels.max(), levels.mean())
