"""Tiled VAE (runtime/vae_tiling.py): tiled decode and encode equal the untiled passes, because every tile's
core lies inside a halo as wide as the receptive field and every GroupNorm uses the whole image's statistics.

Tolerances: float64 on CPU, 1e-10 (the tiles change only the order of float sums); float32 through the
`Networks` wrapper, 1e-4 absolute on values of order 1. A halo one size too small, or per-tile statistics, are
off by 1e-1 and more (checked below), so these bounds tell the schemes apart."""
from __future__ import annotations

import copy

import pytest
import torch

from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.vae_tiling import (TiledVaeNetworks, VaeTiling, VaeTilingError, _tiles, decoder_halo,
                                           encoder_halo, tiled_decode, tiled_encode)


@pytest.fixture(scope="module")
def vae64(tiny_sdxl):
    return copy.deepcopy(tiny_sdxl.vae).double()


def _latent(h, w, dtype=torch.float64):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_tiled_decode_equals_untiled_in_float64(vae64):
    lat = _latent(24, 40)  # 192x320 pixels in 128-pixel tiles: 2 x 3 tiles
    with torch.inference_mode():
        ref = vae64.decode(lat).sample
    out = tiled_decode(vae64, lat, 128)
    assert out.shape == ref.shape == (1, 3, 192, 320)
    assert (out - ref).abs().max().item() < 1e-10


def test_tiled_encode_equals_untiled_in_float64(vae64):
    img = torch.rand(1, 3, 192, 256, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    with torch.inference_mode():
        ref = vae64.encode(img).latent_dist.mean
    out = tiled_encode(vae64, img, 128)
    assert out.shape == ref.shape == (1, 4, 24, 32)
    assert (out - ref).abs().max().item() < 1e-10


def test_per_tile_statistics_or_a_short_halo_would_show(vae64, monkeypatch):
    """The bounds above can fail: cutting the halo short makes the cores wrong by far more than 1e-10."""
    import megafusion.runtime.vae_tiling as vt

    lat = _latent(16, 32)
    with torch.inference_mode():
        ref = vae64.decode(lat).sample
    monkeypatch.setattr(vt, "decoder_halo", lambda d: decoder_halo(d) - 8)
    assert (vt.tiled_decode(vae64, lat, 128) - ref).abs().max().item() > 1e-3


def test_halo_covers_the_receptive_field(tiny_sdxl):
    # tiny VAE, 2 resnets per up block: 4 + 1/2 + 2 + 1/4 + 1 + 1/8 + 1/2 + 1/8 (conv_out) = 8.5 -> 9, + 1
    assert decoder_halo(tiny_sdxl.vae.decoder) == 10
    # 1 resnet per down block: 1 (conv_in) + 2+2 + 4+4 + 8+8 + 16 = 45 pixels -> 48, + 8
    assert encoder_halo(tiny_sdxl.vae.encoder, 8) == 56


def test_tiles_partition_the_image():
    tiles = _tiles(96, 248, 64, 16, 8)
    covered = torch.zeros(96, 248, dtype=torch.int32)
    for t in tiles:
        a, b, c, d = t.core
        assert t.top <= a < b <= t.bottom and t.left <= c < d <= t.right
        assert a % 8 == 0 and c % 8 == 0 and t.top % 8 == 0 and t.left % 8 == 0
        covered[a:b, c:d] += 1
    assert bool((covered == 1).all())


def test_networks_wrapper_tiles_only_large_passes(tiny_sdxl):
    nets = TorchNetworks(tiny_sdxl)
    calls = []
    tiled = TiledVaeNetworks(nets, tiny_sdxl.vae, VaeTiling(128))
    nets_decode = nets.vae_decode
    nets.vae_decode = lambda z: calls.append(z.shape) or nets_decode(z)
    small, large = _latent(16, 16, torch.float32), _latent(16, 24, torch.float32)
    tiled.vae_decode(small)
    assert calls == [small.shape]  # 128x128: one tile, the wrapped networks' own pass
    out = tiled.vae_decode(large)
    assert calls == [small.shape] and out.dtype == torch.float32
    assert (out - nets_decode(large)).abs().max().item() < 1e-4
    img = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert (tiled.vae_encode(img) - nets.vae_encode(img)).abs().max().item() < 1e-4
    assert tiled.unet_dtype == nets.unet_dtype  # everything else is the wrapped networks'


@pytest.mark.slow
def test_generation_with_tiled_relay_and_decode_equals_untiled(tiny_sdxl):
    """The whole stage loop: the relay's decode and encode and the final decode tiled (128-pixel tiles at 256),
    the image within one 8-bit level of the untiled run's everywhere."""
    from megafusion.core.plan import Stage, validate_plan
    from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

    plan = validate_plan(tiny_sdxl.family, [Stage(128, 128, 2), Stage(256, 192, 2)])
    opts = GenerationOptions("a red cube", seed=3)
    ref = MegaFusionPipeline(tiny_sdxl).generate(plan, opts)
    nets = TiledVaeNetworks(TorchNetworks(tiny_sdxl), tiny_sdxl.vae, VaeTiling(128))
    out = MegaFusionPipeline(tiny_sdxl, nets).generate(plan, opts)
    assert (out.latent - ref.latent).abs().max().item() < 1e-4
    assert int((out.image.astype(int) - ref.image.astype(int)).__abs__().max()) <= 1


@pytest.mark.parametrize("tile", [0, 32, 100, -64, 96.0])
def test_bad_tile_size_is_named(tile):
    with pytest.raises(VaeTilingError, match=repr(tile)):
        VaeTiling(tile)


@pytest.mark.gpu
def test_real_size_sdxl_vae_tiled_equals_untiled_on_gpu():
    """SDXL's VAE at random weights, 2048x2048 in 1024-pixel tiles (2 x 2 tiles). fp32 (TF32 off): tiled within
    2e-3 of untiled (values of order 1) and at most a tenth of the difference diffusers' own tiling (per-tile
    statistics and attention, blended) makes. bf16: tiling moves the image less than bf16 itself does (the
    untiled bf16 pass against the fp32 one), on average."""
    from diffusers import AutoencoderKL

    from megafusion.core.families import SDXL

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL.vae).to("cuda").eval()
    lat = torch.randn(1, 4, 256, 256, device="cuda")
    with torch.inference_mode():
        ref = vae.decode(lat).sample
        out = tiled_decode(vae, lat, 1024)
        vae.enable_tiling()
        theirs = vae.decode(lat).sample
        vae.disable_tiling()
    ours_err, their_err = (out - ref).abs().max().item(), (theirs - ref).abs().max().item()
    assert ours_err < 2e-3 and ours_err < their_err / 10, (ours_err, their_err)
    img = (ref / ref.abs().amax()).clamp(-1, 1)
    with torch.inference_mode():
        ref_lat = vae.encode(img).latent_dist.mean
        out_lat = tiled_encode(vae, img, 1024)
    assert (out_lat - ref_lat).abs().max().item() < 2e-3 * max(1.0, ref_lat.abs().max().item())

    vae16 = vae.to(torch.bfloat16)
    with torch.inference_mode():
        untiled16 = vae16.decode(lat.bfloat16()).sample.float()
        tiled16 = tiled_decode(vae16, lat.bfloat16(), 1024).float()
        enc16 = vae16.encode(img.bfloat16()).latent_dist.mean.float()
        tiled_enc16 = tiled_encode(vae16, img.bfloat16(), 1024).float()
    assert (tiled16 - untiled16).abs().mean() <= (untiled16 - ref).abs().mean()
    assert (tiled_enc16 - enc16).abs().mean() <= (enc16 - ref_lat).abs().mean()
