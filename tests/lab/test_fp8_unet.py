"""benchmarks/lab/fp8_unet.py on the CPU: its accuracy part on a tiny model (the GPU parts refused here in one
line), and its table with a skipped compiled variant."""
from __future__ import annotations

import json

import pytest

import fp8_unet


def test_gpu_parts_refused_on_cpu(tmp_path):
    with pytest.raises(SystemExit, match="only accuracy runs on cpu"):
        fp8_unet.main(["--model", "tiny-sd15", "--device", "cpu", "--parts", "accuracy,graphs",
                       "--output", str(tmp_path)])


def test_unknown_part_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8_unet.main(["--model", "tiny-sd15", "--device", "cpu", "--parts", "speed", "--output", str(tmp_path)])
    assert "unknown part(s) speed" in capsys.readouterr().err


def test_unknown_role_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8_unet.main(["--model", "tiny-sd15", "--device", "cpu", "--parts", "accuracy", "--roles", "ff_in,qkv",
                       "--output", str(tmp_path)])
    assert "--roles ff_in,qkv: unknown role(s) qkv" in capsys.readouterr().err


def test_roles_choose_the_fp8_layers(tmp_path):
    """--roles narrows the policy: fewer FP8 layers than the default, recorded in the report."""
    fp8_unet.main(["--model", "tiny-sd15", "--device", "cpu", "--parts", "accuracy", "--timesteps", "21",
                   "--roles", "ff_in,ff_out", "--output", str(tmp_path / "ff")])
    data = json.loads((tmp_path / "ff" / "fp8-tiny-sd15.json").read_text())
    assert "roles=('ff_in', 'ff_out')" in data["policy"]
    assert data["fp8_layers"] == 8  # tiny-sd15: 4 transformer blocks, one ff_in and one ff_out each


def test_table_names_a_skipped_variant():
    report = {"gpu": "g", "model": "m", "plan": "p", "fp8_layers": 3, "torch": "t",
              "compiled": [{"variant": "compiled fp8", "skipped": "10 s of --budget-s left"}]}
    assert "| compiled fp8 | skipped: 10 s of --budget-s left |" in fp8_unet.table(report)


@pytest.mark.slow
def test_accuracy_part_on_tiny_sd15(tmp_path):
    fp8_unet.main(["--model", "tiny-sd15", "--device", "cpu", "--parts", "accuracy", "--timesteps", "999,21",
                   "--output", str(tmp_path)])
    data = json.loads((tmp_path / "fp8-tiny-sd15.json").read_text())
    assert data["fp8_layers"] > 0 and data["commit"]
    stages = data["accuracy"]
    assert [s["dilation"] for s in stages] == [1, 2, 2]  # SD1.5's three stages, dilated after the first
    for s in stages:
        assert 1e-4 < s["max"]["fp8_vs_fp16"] < 0.05, s["max"]
        assert s["max"]["fp16_vs_fp32"] < s["max"]["fp8_vs_fp32"]  # FP8 moves eps more than fp16 does
    md = (tmp_path / "fp8-tiny-sd15.md").read_text()
    assert f"| 0 | {stages[0]['size']} | 1 | {stages[0]['max']['fp8_vs_fp16']:.4f} |" in md


@pytest.mark.slow
def test_static_scales_measured_in_the_accuracy_part(tmp_path):
    """--compiled with fp8s: the accuracy part calibrates a copy of the FP8 UNet on the calibration inputs and
    measures its eps beside the per-token FP8's (CPU here; the compiled fp8s run itself is GPU-only)."""
    fp8_unet.main(["--model", "tiny-sd15", "--device", "cpu", "--parts", "accuracy", "--timesteps", "601",
                   "--compiled", "fp16,fp8s", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "fp8-tiny-sd15.json").read_text())
    cal = data["static_calibration_accuracy"]
    assert cal["layers"] == data["fp8_layers"] and 0 < cal["scale_range"][0] <= cal["scale_range"][1]
    for s in data["accuracy"]:
        assert 1e-4 < s["max"]["fp8s_vs_fp16"] < 0.05, s["max"]
        assert s["max"]["fp8s_vs_fp16"] != s["max"]["fp8_vs_fp16"]  # really another quantization
    assert "| fp8 static scales vs fp16 |" in (tmp_path / "fp8-tiny-sd15.md").read_text()


def test_unknown_compiled_variant_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8_unet.main(["--model", "tiny-sd15", "--device", "cpu", "--parts", "accuracy", "--compiled", "fp8,int8",
                       "--output", str(tmp_path)])
    assert "--compiled fp8,int8: give fp16, fp8" in capsys.readouterr().err
