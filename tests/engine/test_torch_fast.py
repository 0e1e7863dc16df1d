"""The fast torch backend computes the same function: fused QKV and channels_last exactly up to float32
rounding, and the compiled UNet honours the mid-block dilation (dynamo must guard on the conv attributes,
else the dilated stage would silently reuse the standard graph)."""
from __future__ import annotations

import pytest
import torch

from megafusion.engine.attention import sdpa
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


def _storage_bytes(module) -> int:
    """Bytes of the distinct storages under the module's parameters (views of one storage count once)."""
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}.values())


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_fused_projections_hold_no_second_copy(name):
    """After QKV fusion the separate projections are views of the fused weights: the UNet's and VAE's storages
    hold what the unfused modules held, byte for byte, and `released_bytes` is the copies' size (1.21 GiB for SDXL's
    fp16 UNet); the parts still hold their own rows (what a processor set later, IP-Adapter's, reads)."""
    plain = load_model(name)
    bundle = load_model(name)
    nets = FastTorchNetworks(bundle, FastOptions(compile_unet=False, compile_vae=False, cudnn_benchmark=False))
    fused = [m for m in bundle.unet.modules() if getattr(m, "fused_projections", False)]
    assert fused
    copies = 0
    for attn in fused:
        whole = (attn.to_kv if attn.is_cross_attention else attn.to_qkv).weight
        parts = (attn.to_k, attn.to_v) if attn.is_cross_attention else (attn.to_q, attn.to_k, attn.to_v)
        assert torch.equal(torch.cat([p.weight for p in parts]), whole)
        assert all(p.weight.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr() for p in parts)
        copies += sum(t.numel() * t.element_size() for p in parts for t in p.parameters())
    vae_copies = sum(t.numel() * t.element_size() for a in bundle.vae.modules() if getattr(a, "fused_projections", False)
                     for p in (a.to_q, a.to_k, a.to_v) for t in p.parameters())  # the VAE's have biases
    assert nets.released_bytes == copies + vae_copies > 0
    for mine, before in ((bundle.unet, plain.unet), (bundle.vae, plain.vae)):
        assert _storage_bytes(mine) == _storage_bytes(before)


def test_ip_adapter_after_fusion_reads_the_shared_parts():
    """mf-generate --mode compiled/fast-graphs loads an IP-Adapter after the fast path's fusion (diffusers' loader
    failed there, making megafusion's processor anew with no kernel): its processors call the separate projections,
    now views of the fused weights, and the self-attentions keep their kernel. A relay gives the plain modules' IP
    latent."""
    from megafusion.core.plan import Stage, validate_plan
    from megafusion.runtime.ipadapter import IPAdapterNetworks, load_ip_adapter
    from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
    from tests.runtime.test_ipadapter import CLIP_DIM, tiny_ip_adapter

    ref_bundle, fast_bundle = load_model("tiny-sdxl"), load_model("tiny-sdxl")
    state = tiny_ip_adapter(ref_bundle.unet, seed=4)
    embeds = torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(5))
    fast = FastTorchNetworks(fast_bundle, FastOptions(compile_unet=False, compile_vae=False, cudnn_benchmark=False,
                                                      unet_attention="chunked"))
    for b in (ref_bundle, fast_bundle):
        load_ip_adapter(b.unet, state, scale=0.7)
    selfs = [p for n, p in fast_bundle.unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert selfs and all(type(p).__name__ == "AttnProcessor" and p.attend is not sdpa for p in selfs)
    plan = validate_plan(ref_bundle.family, [Stage(128, 128, 2), Stage(192, 192, 1)])
    opts = GenerationOptions("a teapot", seed=1)
    ref = MegaFusionPipeline(ref_bundle, IPAdapterNetworks(TorchNetworks(ref_bundle), embeds), "cpu").generate(plan, opts)
    got = MegaFusionPipeline(fast_bundle, IPAdapterNetworks(fast, embeds), "cpu").generate(plan, opts)
    assert _relerr(got.latent, ref.latent) < 1e-5


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
