"""benchmarks/lab/fp8_gemm_modes.py on the CPU: the GEMM shapes of one UNet step add up to the FLOPs fp8_floor.py
counts its own way, and each scaling form runs at a tiny model's shapes (plumbing; the timing is the GPU's)."""
from __future__ import annotations

import json

import fp8_floor
import fp8_gemm_modes
import pytest
import torch

from megafusion.core.families import get_family


@pytest.mark.parametrize("model,size", [("tiny-sd15", (128, 128)), ("tiny-sdxl", (192, 128))])
def test_shapes_add_up_to_fp8_floors_count(model, size):
    fam = get_family(model)
    w, h = size
    shapes = fp8_gemm_modes.gemm_shapes(fam, h, w)
    flops = sum(2 * m * k * n * c for (m, k, n), c in shapes.items())
    assert flops / 1e12 == pytest.approx(fp8_floor.fp8_tflop_per_step(fam, h, w), rel=1e-12)
    assert all(m % 2 == 0 for m, _, _ in shapes)  # the CFG batch of two


def test_forms_agree_on_a_product():
    """At scales of one the three forms compute the same product of the e4m3-rounded operands (fp16/bf16 out)."""
    calls = fp8_gemm_modes.forms(32, 64, 48, "cpu")
    x, w, xq, wq = fp8_gemm_modes._operands(32, 64, 48, "cpu")
    want = xq.float() @ wq.float().t()
    for name in ("fp8-rows", "fp8-tensor"):
        torch.testing.assert_close(calls[name]().float(), want, rtol=1e-2, atol=1e-1)
    torch.testing.assert_close(calls["bf16"]().float(), x.float() @ w.float().t(), rtol=1e-2, atol=1e-1)


def test_main_writes_its_report(tmp_path):
    assert fp8_gemm_modes.main(["--model", "tiny-sd15", "--sizes", "128x128", "--device", "cpu", "--warmup", "0",
                                "--repeats", "1", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "fp8_gemm_modes_tiny-sd15.json").read_text())
    assert data["device"] == "cpu" and data["totals"][0]["layers"] == 24  # tiny-sd15's FP8 layers, once each
    assert set(data["rows"][0]["ms"]) == set(fp8_gemm_modes.FORMS)
    assert "| 128x128 | 24 |" in (tmp_path / "fp8_gemm_modes_tiny-sd15.md").read_text()


def test_bad_size_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8_gemm_modes.main(["--model", "tiny-sd15", "--sizes", "128x", "--device", "cpu", "--output", str(tmp_path)])
    assert "--sizes 128x: malformed size" in capsys.readouterr().err
