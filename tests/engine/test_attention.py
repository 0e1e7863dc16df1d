"""Attention kernels per module compute the same function as diffusers' own processors: the chunked kernel
against torch's SDPA in float64 (so chunking is the only difference), whole UNet and VAE against their
default processors in float32 within 1e-5 relative, and an unknown kernel name is refused by name."""
from __future__ import annotations

import pytest
import torch

from megafusion.engine.attention import AttnProcessor, attend_fn, chunked, sdpa, set_attention
from megafusion.core.loading import load_model


def _relerr(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("n,chunk", [(100, 7), (64, 64), (33, 1000)])
def test_chunked_equals_sdpa_float64(n, chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for _ in range(3))
    k = k[:, :, : n // 2 + 1]
    v = v[:, :, : n // 2 + 1]
    out = chunked(chunk)(q, k, v)
    assert out.shape == (2, n, 3 * 16)
    assert _relerr(out, sdpa(q, k, v)) < 1e-12


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("fuse", [False, True])
def test_processor_same_function(name, fuse):
    b = load_model(name)
    g = torch.Generator().manual_seed(1)
    fam = b.family
    z = torch.randn(2, 4, 16, 24, generator=g)
    ehs = torch.randn(2, 77, fam.unet["cross_attention_dim"], generator=g)
    added = None
    if fam.is_xl:
        added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    img = torch.randn(1, 3, 64, 96, generator=g)
    t = torch.tensor(500)

    def run():
        with torch.no_grad():
            return (b.unet(z, t, ehs, added_cond_kwargs=added).sample, b.vae.decode(z[:1]).sample,
                    b.vae.encode(img).latent_dist.mean)

    ref = run()
    if fuse:
        b.unet.fuse_qkv_projections()
        b.vae.fuse_qkv_projections()
    set_attention(b.unet, "chunked")
    b.vae.set_attn_processor(AttnProcessor(chunked(5)))  # several chunks even at the tiny VAE's 96 tokens
    assert all(isinstance(p, AttnProcessor) for p in b.unet.attn_processors.values())
    for got, want in zip(run(), ref):
        assert _relerr(got, want) < 1e-5


def test_unknown_kernel_named():
    with pytest.raises(ValueError, match="'flashy'"):
        attend_fn("flashy")


def test_fa4_without_package_says_what_is_missing():
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="flash-attn-4"):
            attend_fn("fa4")
    else:
        pytest.skip("flash-attn-4 is installed here: the missing-package error cannot be shown")


def test_cudnn_kernel_falls_back_where_cudnn_has_none():
    """cuDNN's attention takes CUDA fp16/bf16 only: forced on fp32 (an fp32 model in --mode fast-graphs) it found
    no kernel at all and the run failed; the `cudnn` kernel gives torch's SDPA result there instead."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g) for _ in range(3))
    out = attend_fn("cudnn")(q, k, v)
    assert out.shape == (2, 10, 48) and out.is_contiguous()
    assert _relerr(out, sdpa(q, k, v)) < 1e-6
