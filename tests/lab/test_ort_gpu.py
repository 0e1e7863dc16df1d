"""The ORT CUDA-EP benchmark's helpers, its refusal without CUDA, and its steps on CPU (tiny-sdxl, CPU EP)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ort_gpu
from ort_gpu_report import (DEFAULT_ENGINE_DIR, JSON_NAME, MD_NAME, Report, cuda_problem,
                                                  export_rows, image_diff, markdown, parse_args, tensor_diff,
                                                  time_summary)
from megafusion.engine.cache import FileRecord
from megafusion.engine.onnxruntime_backend import shrink_config
from megafusion.core.families import SDXL
from megafusion.export.onnx_export import _resolve
from megafusion.core.plan import default_plan


def test_parse_args_defaults_and_flags(tmp_path):
    a = parse_args(["--output", str(tmp_path)])
    assert (a.model, a.engine_dir, a.seed, a.gen_repeats) == ("sdxl", DEFAULT_ENGINE_DIR, 0, 2)
    assert not (a.skip_export or a.skip_unet or a.skip_generation or a.skip_sd15_export or a.cuda_graph)
    a = parse_args(["--output", "o", "--skip-sd15-export", "--skip-unet", "--cuda-graph", "--vae-precision", "fp16"])
    assert a.skip_sd15_export and a.skip_unet and a.cuda_graph and a.vae_precision == "fp16"


@pytest.mark.parametrize("argv", [[], ["--output", "o", "--model", "sd3"], ["--output", "o", "--unet-iters", "0"]])
def test_parse_args_rejects(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_refuses_without_cuda_with_a_clear_message(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert ort_gpu.main(["--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ort_gpu: error:") and "CUDA" in err and "Traceback" not in err
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert "CUDA" in data["fatal"] and "Not run" in (tmp_path / MD_NAME).read_text()


def test_cpu_only_onnxruntime_is_named(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    msg = cuda_problem()
    assert "CUDAExecutionProvider" in msg and "onnxruntime-gpu" in msg and "ort_gpu_install.sh" in msg


def test_report_records_errors_and_goes_on(tmp_path):
    r = Report(tmp_path)
    with r.guarded("first") as st:
        st["plan"] = "p"
        raise RuntimeError("boom at 2048")
    with r.guarded("second") as st:
        st["rows"] = []
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert data["steps"]["first"]["status"] == "error" and "boom at 2048" in data["steps"]["first"]["error"]
    assert "RuntimeError" in data["steps"]["first"]["traceback"]
    assert data["steps"]["second"]["status"] == "ok" and data["steps"]["second"]["seconds"] >= 0
    md = (tmp_path / MD_NAME).read_text()
    assert "## first: error" in md and "boom at 2048" in md and "## second: ok" in md
    assert not list(tmp_path.glob(".*.tmp"))


def _entry(digest, network, variant, files):
    key = SimpleNamespace(network=network, variant=variant, precision="fp16", profiles=())
    return SimpleNamespace(digest=digest, key=key, files=tuple(FileRecord(p, "x", s) for p, s in files))


def test_export_rows_sizes_and_times():
    unet = _entry("a", "unet", "dilated", [("d/model.onnx", 3 * 2**20), ("d/model.onnx.data", 5 * 2**30)])
    text = _entry("b", "text_encoder", "standard", [("t/model.onnx", 2**20)])
    report = SimpleNamespace(built=[(unet, 95.5)], skipped=[text], exports={"a": SimpleNamespace(seconds=80.25)})
    rows = export_rows(report, 8)
    assert rows[0] == {"network": "unet-dilated-fp16", "status": "built", "sizes": ["fixed"], "export_s": 80.25,
                       "build_s": 95.5, "onnx_bytes": 3 * 2**20, "external_data_bytes": 5 * 2**30,
                       "total_bytes": 3 * 2**20 + 5 * 2**30}
    assert rows[1]["network"] == "text_encoder-fp16" and rows[1]["export_s"] is None
    assert rows[1]["status"].startswith("skipped") and rows[1]["external_data_bytes"] == 0
    md = markdown({"steps": {"export_sdxl": {"status": "ok", "seconds": 1.0, "rows": rows}}})
    assert "| unet-dilated-fp16 | fixed | 80.2 | 95.5 | 3.0 | 5120.0 | 5123.0 | built |" in md


def test_diffs_and_times():
    ref = torch.tensor([1.0, -4.0, 2.0])
    d = tensor_diff(torch.tensor([1.0, -3.5, 2.0], dtype=torch.float16), ref)
    assert d["max_abs"] == 0.5 and d["ref_max_abs"] == 4.0 and d["max_rel"] == 0.125 and d["nonfinite"] == 0
    assert tensor_diff(torch.tensor([float("nan"), 0.0, 0.0]), ref)["nonfinite"] == 1
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert image_diff(a, b) == {"max_abs_uint8": 255, "mean_abs_uint8": 255 / 12, "frac_differing": 1 / 12}
    with pytest.raises(ValueError):
        image_diff(a, b[:1])
    t = time_summary([0.3, 0.1, 0.2], first_s=2.0)
    assert t["median_ms"] == pytest.approx(200) and t["min_ms"] == pytest.approx(100) and t["first_ms"] == 2000


def test_unet_cases_of_the_sdxl_plan():
    cases = ort_gpu._unet_cases(default_plan(SDXL), 8)
    assert cases == [("1024x1024 standard", 128, 128, 1), ("2048x2048 standard", 256, 256, 1),
                     ("2048x2048 dilated", 256, 256, 2)]


def test_device_resolution_and_shrink_config():
    assert _resolve("cpu") == torch.device("cpu")
    assert shrink_config(torch.device("cuda", 1)) == "gpu:1" and shrink_config(torch.device("cuda")) == "gpu:0"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny-sdxl's default plan exported and built by the benchmark's own step, on the CPU (CPU EP)."""
    out = tmp_path_factory.mktemp("ortgpu")
    old, ort_gpu.DEV = ort_gpu.DEV, torch.device("cpu")
    try:
        args = parse_args(["--output", str(out / "res"), "--model", "tiny-sdxl", "--unet-warmup", "0",
                           "--unet-iters", "1", "--gen-repeats", "1"])
        report = Report(args.output)
        bundle, plan = ort_gpu.load("tiny-sdxl", 0, report.step("load"))
        with report.guarded("export") as st:
            ort_gpu.export(bundle, plan, out / "eng", args, st, report)
        nets = ort_gpu.open_ort(bundle, plan, out / "eng", report.step("open"))
        ort_gpu.to_device(bundle)  # as `run` does once the engines are open
        yield SimpleNamespace(args=args, report=report, bundle=bundle, plan=plan, nets=nets)
    finally:
        ort_gpu.DEV = old


@pytest.mark.slow
def test_export_step_records_every_network(built):
    st = built.report.data["steps"]["export"]
    assert st["status"] == "ok", st.get("error")
    names = [r["network"] for r in st["rows"]]
    assert names == ["text_encoder-fp16", "text_encoder_2-fp16", "unet-standard-fp16", "unet-dilated-fp16",
                     "vae_decoder-fp32", "vae_encoder-fp32"]
    assert all(r["export_s"] > 0 and r["build_s"] >= r["export_s"] and r["onnx_bytes"] > 0 for r in st["rows"])
    assert any("exported ONNX" in line for line in st["log"])
    assert json.loads((built.report.dir / JSON_NAME).read_text())["steps"]["export"]["rows"] == st["rows"]


@pytest.mark.slow
def test_unet_latency_on_cpu(built):
    st = built.report.step("unet")
    ort_gpu.unet_latency(built.bundle, built.plan, built.nets, built.args, st, built.report)
    assert [c["case"] for c in st["cases"]] == ["128x128 standard", "256x256 standard", "256x256 dilated"]
    for c in st["cases"]:
        assert "error" not in c, c.get("error")
        assert c["ort"]["median_ms"] > 0 and c["torch"]["median_ms"] > 0
        assert c["diff"]["max_rel"] < 0.01 and c["diff"]["nonfinite"] == 0  # fp16 ORT vs fp16 torch
    shrinks = {n: r.shrink_arena for (n, _), r in built.nets.runners.items()}
    assert shrinks["vae_decoder"] and shrinks["vae_encoder"] and not shrinks["unet"]  # what load.py asks


@pytest.mark.slow
def test_generation_ort_vs_hybrid_compare(built):
    from megafusion.engine.networks import TorchNetworks

    a, b = {}, {}
    got = ort_gpu.generate(built.bundle, built.plan, built.nets, built.args, a)
    hybrid = ort_gpu.HybridNetworks(built.nets, TorchNetworks(built.bundle, torch.float32))
    ref = ort_gpu.generate(built.bundle, built.plan, hybrid, built.args, b)
    assert a["median_s"] > 0 and "stage 2 (256x256, 10 steps)" in a["segments_s"] and "torch_peak_gib" not in a
    ort_gpu.compare(b, ref, got)
    assert b["image"]["max_abs_uint8"] <= 16 and b["latent_relerr_l2"] < 0.05  # same UNet; ORT vs torch VAE
