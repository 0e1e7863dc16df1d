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
    assert list(report["modes"]) == ["cpp", "cpp-no-graphs", "python-aoti", "python-eager"]
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
