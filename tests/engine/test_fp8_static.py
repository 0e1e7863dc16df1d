"""Static activation scales for FP8 layers (engine/fp8.py `calibrate_input_scales`): the layer quantizes its input
with one fixed scale (a multiply and a cast, no amax reduction), equal to the dequantized emulation; values beyond
the calibrated range saturate; a tiny UNet calibrated on other inputs stays within 5% of float; the refusals."""
from __future__ import annotations

import pytest
import torch

from megafusion.engine.fp8 import (FP8, FP8_MAX, Fp8Linear, calibrate_input_scales, dequantize_rows,
                                   emulated_scaled_mm, quantize_unet, set_input_scales)


def _layer(seed=0, n_in=64, n_out=48, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
        lin.bias.copy_(torch.randn(n_out, generator=g))
    return Fp8Linear.from_linear(lin), g


def test_static_layer_equals_per_tensor_emulation():
    fp8, g = _layer()
    x = torch.randn(70, 64, generator=g)
    scales = calibrate_input_scales(fp8, lambda: fp8(x))
    s = float(x.abs().max()) / FP8_MAX
    assert scales == {"": pytest.approx(s, rel=1e-6)}
    assert fp8.input_scale.dtype == torch.float32 and "input static" in repr(fp8)
    y = fp8(x)
    xq = (x / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    emu = emulated_scaled_mm(xq, torch.full((70, 1), s), fp8.weight_fp8, fp8.weight_scale, fp8.bias, torch.float32)
    torch.testing.assert_close(y, emu, rtol=1e-5, atol=1e-4)
    ref = x.double() @ dequantize_rows(fp8.weight_fp8, fp8.weight_scale.reshape(-1, 1)).double().t() + fp8.bias.double()
    rel = float((y.double() - ref).norm() / ref.norm())
    assert 1e-3 < rel < 0.05, rel  # really quantized, and within a few percent


def test_beyond_the_calibrated_range_saturates():
    """Per token, 10x the input gives 10x the output; with a static scale it clips at the calibrated amax."""
    g = torch.Generator().manual_seed(1)
    fp8 = Fp8Linear(torch.randn(48, 64, generator=g), None)  # no bias: the output scales with the input
    x = torch.randn(32, 64, generator=g)
    dynamic = fp8(10 * x)
    calibrate_input_scales(fp8, lambda: fp8(x))
    static = fp8(10 * x)
    assert float((dynamic - 10 * fp8(x)).norm() / dynamic.norm()) < 0.05
    assert float((static - dynamic).norm() / dynamic.norm()) > 0.3


def test_tiny_unet_calibrated_on_other_inputs_within_five_percent_of_float():
    from megafusion.core.loading import load_model
    from megafusion.engine.networks import TorchNetworks

    ref_bundle, bundle = load_model("tiny-sd15"), load_model("tiny-sd15")
    quantize_unet(bundle.unet)
    nets, ref_nets = TorchNetworks(bundle), TorchNetworks(ref_bundle)
    dim = bundle.family.unet["cross_attention_dim"]

    def eps(n, seed, t):
        g = torch.Generator().manual_seed(seed)
        x, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, dim, generator=g)
        with torch.inference_mode():
            return n.unet(x, torch.tensor(t), ehs, None, None, 2)

    scales = calibrate_input_scales(bundle.unet, lambda: [eps(nets, 1, t) for t in (901, 401, 51)])
    assert len(scales) == sum(isinstance(m, Fp8Linear) for m in bundle.unet.modules()) > 0
    got, ref = eps(nets, 7, 601), eps(ref_nets, 7, 601)
    rel = float((got.double() - ref.double()).norm() / ref.double().norm())
    assert 1e-4 < rel < 0.05, rel


def test_set_input_scales_refusals():
    m = torch.nn.Sequential(_layer(0)[0], torch.nn.GELU(), Fp8Linear.from_linear(torch.nn.Linear(48, 32)))
    with pytest.raises(ValueError, match=r"1 without a scale \(e.g. 2\)"):
        set_input_scales(m, {"0": 0.1})
    with pytest.raises(ValueError, match=r"1 unknown \(e.g. 5\)"):
        set_input_scales(m, {"0": 0.1, "2": 0.1, "5": 0.1})
    with pytest.raises(ValueError, match=r"scale of 2: 0.0, must be a finite number > 0"):
        set_input_scales(m, {"0": 0.1, "2": 0.0})
    with pytest.raises(ValueError, match=r"scale of 0: inf, must be a finite number > 0"):
        set_input_scales(m, {"0": float("inf"), "2": 0.1})
    assert m[0].input_scale is None and m[2].input_scale is None  # a refused set leaves no layer half-set
    with pytest.raises(ValueError, match="no input to 1 FP8 layer"):
        calibrate_input_scales(m, lambda: m[0](torch.randn(4, 64)))
    assert all(layer.calibrating is False for layer in (m[0], m[2]))


@pytest.mark.slow
def test_static_layer_survives_compile_fullgraph():
    torch._dynamo.reset()
    fp8, g = _layer(3, 64, 64)
    m = torch.nn.Sequential(fp8, torch.nn.GELU(), Fp8Linear.from_linear(torch.nn.Linear(64, 32)))
    x = torch.randn(40, 64, generator=g)
    calibrate_input_scales(m, lambda: m(x))
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_static_scaled_mm_cuda_equals_emulation():
    fp8, g = _layer(4, 640, 1280, torch.bfloat16)
    fp8 = fp8.to("cuda")
    x = torch.randn(2 * 4096, 640, generator=g).to("cuda", torch.bfloat16)
    calibrate_input_scales(fp8, lambda: fp8(x))
    y = fp8(x)
    s = fp8.input_scale
    xq = (x * (1.0 / s)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    emu = emulated_scaled_mm(xq, s.expand(x.shape[0], 1), fp8.weight_fp8, fp8.weight_scale, fp8.bias, torch.float32)
    assert float((y.float() - emu).norm() / emu.norm()) < 1e-2  # bf16 output, accumulator differences
