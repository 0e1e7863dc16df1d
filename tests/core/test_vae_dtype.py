"""The VAE's default dtype (core/specs.py `default_vae_dtype`): SDXL's VAE, which overflows in fp16, runs in
bf16 on CUDA and fp32 elsewhere; bf16 stays close to fp32 on random weights. The check with real SDXL weights
is not made here (none can be had)."""
from __future__ import annotations

import copy

import torch

from megafusion.core.families import SD15, SDXL, TINY_SDXL
from megafusion.core.specs import default_vae_dtype

CUDA, CPU = torch.device("cuda"), torch.device("cpu")

BF16_REL_L2 = 0.05
"""bf16 against fp32, relative L2 of decode and encode on random weights (bf16 keeps 8 bits of mantissa; measured
0.032 decode and 0.011 encode on tiny-sdxl, whose random weights amplify rounding more than trained ones)."""

BF16_MEAN_LEVELS = 1.5
"""Mean difference of the decoded 8-bit image (measured 0.70 levels)."""


def test_the_sdxl_vae_runs_in_bf16_on_cuda_and_fp32_elsewhere():
    for fam in (SDXL, TINY_SDXL):
        assert default_vae_dtype(fam, fam.vae, torch.float16, CUDA) == torch.bfloat16
        assert default_vae_dtype(fam, fam.vae, torch.float16, CPU) == torch.float32
        assert default_vae_dtype(fam, fam.vae, torch.float32, CUDA) == torch.float32
        assert default_vae_dtype(fam, {**fam.vae, "force_upcast": False}, torch.float16, CUDA) == torch.float16
    assert default_vae_dtype(SD15, SD15.vae, torch.float16, CUDA) == torch.float16  # SD1.5's VAE runs in fp16


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_decode_and_encode_stay_close_to_fp32(tiny_sdxl):
    vae32 = tiny_sdxl.vae
    vae16 = copy.deepcopy(vae32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    lat, img = torch.randn(1, 4, 32, 24, generator=g), torch.rand(1, 3, 256, 192, generator=g) * 2 - 1
    with torch.inference_mode():
        d16, d32 = vae16.decode(lat.bfloat16()).sample, vae32.decode(lat).sample
        enc = _rel(vae16.encode(img.bfloat16()).latent_dist.mean, vae32.encode(img).latent_dist.mean)
    dec = _rel(d16, d32)
    assert dec < BF16_REL_L2 and enc < BF16_REL_L2, (dec, enc)
    assert dec > 0 and enc > 0  # the two ran in different precisions
    levels = lambda x: ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round()  # noqa: E731 - as the runtime rounds
    assert float((levels(d16) - levels(d32)).abs().mean()) < BF16_MEAN_LEVELS
