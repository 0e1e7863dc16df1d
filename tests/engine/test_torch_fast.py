"""The fast torch backend computes the same function: fused QKV and channels_last exactly up to float32
rounding, and the compiled UNet honours the mid-block dilation (dynamo must guard on the conv attributes,
else the dilated stage would silently reuse the standard graph)."""
from __future__ import annotations

import pytest
import torch

from megafusion.engine.networks import TorchNetworks
from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks
from megafusion.core.loading import load_model


def _inputs(bundle, device, h=16, w=24):
    g = torch.Generator().manual_seed(0)
    fam = bundle.family
    d = fam.unet["cross_attention_dim"]
    x = torch.randn(2, 4, h, w, generator=g).to(device)
    ehs = torch.randn(2, 77, d, generator=g).to(device)
    te = tid = None
    if fam.is_xl:
        te = torch.randn(2, 32, generator=g).to(device)
        tid = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * 2, dtype=torch.float32, device=device)
    return x, torch.tensor(601, device=device), ehs, te, tid


def _relerr(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check(name, device, options, tol):
    ref_bundle = load_model(name, device=device)
    fast_bundle = load_model(name, device=device)  # same seed: same weights, modules of its own
    ref, fast = TorchNetworks(ref_bundle), FastTorchNetworks(fast_bundle, options)
    args = _inputs(ref_bundle, device)
    outs = {}
    for dil in (1, 2, 1):
        r, f = ref.unet(*args, dil), fast.unet(*args, dil)
        assert _relerr(f, r) < tol, (dil, _relerr(f, r))
        outs[dil] = f
    assert _relerr(outs[2], outs[1]) > 1e-3  # the dilated variant really ran
    img = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)).to(device)
    assert _relerr(fast.vae_encode(img), ref.vae_encode(img)) < tol
    lat = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2)).to(device)
    assert _relerr(fast.vae_decode(lat), ref.vae_decode(lat)) < tol


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_fused_qkv_channels_last_same_function_cpu(name):
    _check(name, "cpu", FastOptions(compile_unet=False, compile_vae=False, cudnn_benchmark=False), 1e-5)


def test_fast_graphs_options_same_function_cpu():
    """`--mode fast-graphs`'s networks (fast_graphs_options: no compiling; cuDNN attention on CUDA, torch's SDPA
    here) compute what the plain modules do."""
    from dataclasses import replace

    from megafusion.engine.torch_fast import fast_graphs_options

    options = fast_graphs_options("cpu")
    assert not options.compile_unet and not options.compile_vae and options.unet_attention == "sdpa"
    assert fast_graphs_options("cuda").unet_attention == "cudnn"
    _check("tiny-sdxl", "cpu", replace(options, cudnn_benchmark=False), 1e-5)


@pytest.mark.slow
def test_compiled_unet_honours_dilation_cpu():
    _check("tiny-sdxl", "cpu", FastOptions(compile_vae=False, cudnn_benchmark=False), 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_compiled_same_function_gpu(name, no_tf32):
    _check(name, "cuda", FastOptions(), 1e-4)


@pytest.mark.gpu
def test_fast_graphs_options_same_function_gpu(no_tf32):
    from megafusion.engine.torch_fast import fast_graphs_options

    _check("tiny-sdxl", "cuda", fast_graphs_options("cuda"), 1e-4)
