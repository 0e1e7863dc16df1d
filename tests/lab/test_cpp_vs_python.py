"""`benchmarks.cpp_vs_python` on CPU with tiny-sd15: the C++ example and the Python runtime run the same
AOTInductor engines, the report records both timings and their images agree within one level."""
from __future__ import annotations

import json

import pytest

from cpp_vs_python import main, parse_cpp_output

from ..conftest import AOTI_STAGES


def test_parse_cpp_output_reads_the_timing_line():
    load, times = parse_cpp_output("warning\n512x512 -> a.png; engines loaded in 1.25 s; generate 3.500 3.250 s\n")
    assert load == 1.25 and times == [3.5, 3.25]
    with pytest.raises(ValueError, match="no timing line"):
        parse_cpp_output("mf-generate-cpp: error")


@pytest.mark.slow
def test_cpu_report_has_both_paths_and_equal_images(cpp_build, sd15_aoti, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(["--model", "tiny-sd15", "--engines", str(sd15_aoti), "--cpp-bin",
                 str(cpp_build / "cpp" / "mf-generate-cpp"), "--output", str(out), "--stages", AOTI_STAGES,
                 "--device", "cpu", "--repeats", "1"]) == 0
    report = json.loads((out / "cpp_vs_python.json").read_text())
    # CUDA-only modes left out on CPU
    assert list(report["modes"]) == ["cpp", "cpp-no-graphs", "python-aoti", "python-eager",
                                     "python-eager-alt-attention"]
    assert report["modes"]["cpp"]["median_s"] > 0 and len(report["modes"]["python-aoti"]["all_s"]) == 1
    assert report["modes"]["python-aoti"]["image_diff_vs_cpp"]["max"] <= 1
    assert report["modes"]["python-eager"]["image_diff_vs_cpp"]["max"] <= 1  # fp32: engines equal the modules
    nets = {(r["network"], r["size"]) for r in report["networks"]}  # every package at every size it runs
    assert ("unet-standard-fp32", "128x128") in nets and ("vae_decoder-fp32", "256x256") in nets
    assert all(r["rel"] < 1e-3 and r["rel_l2"] < 1e-3 for r in report["networks"])
    assert all("package_vs_fp32_rel_l2" not in r for r in report["networks"])  # fp32 packages: no second reference
    assert report["modes"]["python-aoti"]["latent_rel_l2_vs_eager"] < 1e-4  # fp32 engines denoise as the modules
    assert report["modes"]["python-aoti"]["image_diff_vs_eager_eager_decode"]["max"] <= 1
    assert "python-aoti" in (out / "cpp_vs_python.md").read_text()


def test_eager_with_another_attention_kernel_is_recorded_beside_eager(tmp_path):
    out = tmp_path / "out"
    assert main(["--model", "tiny-sd15", "--engines", str(tmp_path), "--output", str(out), "--stages", AOTI_STAGES,
                 "--device", "cpu", "--repeats", "1", "--modes", "python-eager,python-eager-alt-attention"]) == 0
    report = json.loads((out / "cpp_vs_python.json").read_text())
    alt = report["modes"]["python-eager-alt-attention"]
    assert list(report["modes"]) == ["python-eager", "python-eager-alt-attention"]
    assert alt["attention_backends"] == ["MATH"]
    # float32: another attention kernel moves the trajectory by rounding only
    assert alt["latent_rel_l2_vs_eager"] < 1e-4 and alt["image_diff_vs_eager"]["max"] <= 1
    assert alt["image_diff_vs_eager_eager_decode"]["max"] <= 1


def test_alt_attention_without_eager_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny-sd15", "--engines", str(tmp_path), "--output", str(tmp_path / "o"), "--device", "cpu",
              "--modes", "python-aoti,python-eager-alt-attention"])
    assert e.value.code == 2 and "runs beside python-eager" in capsys.readouterr().err


def test_other_attention_changes_the_kernel_on_the_cpu():
    import torch

    from cpp_vs_python import other_attention

    q = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(0))
    default = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    ctx, allowed = other_attention(torch.device("cpu"))
    with ctx:
        math = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    # the same attention by another kernel: equal within float32 rounding, not bit for bit
    assert allowed == ["MATH"] and torch.allclose(math, default, atol=1e-5) and not torch.equal(math, default)
