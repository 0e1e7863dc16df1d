"""benchmarks/lab/fp8_act_scales.py on the CPU: FP8 activation scale schemes, emulated, against float32."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fp8_act_scales
from megafusion.engine.fp8 import emulated_scaled_mm, quantize_rows


def _layer(k=64, n=32):
    torch.manual_seed(0)
    return nn.Linear(k, n)


def test_row_scheme_is_the_engine_emulation():
    lin, x = _layer(), torch.randn(3, 5, 64)
    emu = fp8_act_scales.EmulatedFp8Linear(lin)
    wq, ws = quantize_rows(lin.weight.detach())
    xq, xs = quantize_rows(x.reshape(-1, 64))
    want = emulated_scaled_mm(xq, xs, wq, ws.reshape(1, -1), lin.bias, torch.float32).reshape(3, 5, 32)
    torch.testing.assert_close(emu(x), want, rtol=1e-5, atol=1e-5)


def test_static_scale_calibrated_on_the_input_is_the_tensor_scale():
    lin, x = _layer(), torch.randn(40, 64)
    emu = fp8_act_scales.EmulatedFp8Linear(lin)
    emu.calibrating = True
    emu(x)
    emu.calibrating = False
    emu.scheme = "tensor"
    per_tensor = emu(x)
    emu.scheme = "static"
    assert torch.equal(emu(x), per_tensor)
    emu.scheme = "row"  # per token differs from one scale for the whole tensor
    assert not torch.equal(emu(x), per_tensor)


def test_static_scale_saturates_beyond_its_calibration():
    lin = _layer()
    emu = fp8_act_scales.EmulatedFp8Linear(lin)
    emu.scheme, emu.static_amax = "static", 1.0
    x = torch.randn(8, 64)
    x[0, 0] = 50.0  # far past the calibrated amax: quantized as 1.0
    clipped = x.clone()
    clipped[0, 0] = 1.0
    assert torch.equal(emu(x), emu(clipped))


def test_bad_margin_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8_act_scales.main(["--model", "tiny-sd15", "--margin", "0", "--output", str(tmp_path)])
    assert "--margin 0.0: must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_three_schemes_on_tiny_sd15(tmp_path):
    fp8_act_scales.main(["--model", "tiny-sd15", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "fp8-act-scales-tiny-sd15.json").read_text())
    assert data["restored"] and data["layers"] > 0
    rows = {r["scheme"]: r for r in data["rows"]}
    assert set(rows) == set(fp8_act_scales.SCHEMES)
    for k, r in rows.items():
        assert 0 < r["rel_l2_max"] < 0.05, (k, r)
    assert rows["tensor"]["rel_l2_per_timestep"] != rows["row"]["rel_l2_per_timestep"]
    md = (tmp_path / "fp8-act-scales-tiny-sd15.md").read_text()
    assert f"| per tensor, every call | {rows['tensor']['rel_l2_max']:.4f} |" in md


def test_bad_timesteps_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8_act_scales.main(["--model", "tiny-sd15", "--calibration-timesteps", "801,1200", "--output", str(tmp_path)])
    assert "--calibration-timesteps 801,1200: give timesteps in [0, 999]" in capsys.readouterr().err
