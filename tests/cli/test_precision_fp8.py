"""`--precision fp8` (mf-generate) and `--variants compiled-fp8` (mf-bench) are refused in one line, exit status 2,
before any model load, where FP8 cannot run: the CPU, a GPU without FP8 tensor cores, engines, a non-bf16 dtype."""
from __future__ import annotations

import pytest
import torch

from megafusion.cli import generate as gen_cli
from megafusion.cli.common import UsageError, fp8_dtype_from_args

from tests.cli.refusals import refused as _refused

pytestmark = pytest.mark.usefixtures("no_model_load")


GEN = ["--model", "tiny-sdxl", "--prompt", "x", "--no-progress", "--stages", "128x128:1"]


def test_generate_fp8_on_cpu_refused(capsys, tmp_path):
    _refused("mf-generate", GEN + ["--device", "cpu", "--precision", "fp8", "--output", str(tmp_path / "a.png")],
             capsys, "--precision fp8 needs a CUDA GPU", "8.9", "got cpu")
    assert not list(tmp_path.iterdir())


def test_generate_fp8_with_engines_refused(capsys, tmp_path):
    _refused("mf-generate", GEN + ["--device", "cpu", "--precision", "fp8", "--engines", str(tmp_path),
                                   "--output", str(tmp_path / "a.png")],
             capsys, "--precision fp8 with --engines", "torch modules")


def test_generate_unknown_precision_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's choice check
        gen_cli.main(GEN + ["--precision", "int4", "--output", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--precision: invalid choice: 'int4'" in err, err


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt", "aoti", "torch"])
def test_build_engines_fp8_refused_for_every_backend(capsys, tmp_path, backend):
    _refused("mf-build-engines", ["--model", "tiny-sd15", "--device", "cpu", "--stages", "128x128:1", "--backend",
                                  backend, "--precision", "fp8", "--output", str(tmp_path / "e")], capsys,
             "--precision fp8: no backend builds FP8 engines yet", f"({backend} included)")
    assert not (tmp_path / "e").exists()


def test_bench_compiled_fp8_on_cpu_refused(capsys, tmp_path):
    _refused("mf-bench", ["--model", "tiny-sd15", "--device", "cpu", "--steps", "4", "--variants", "compiled-fp8",
                          "--output", str(tmp_path)], capsys, "compiled-fp8", "needs a CUDA device")


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of the given capability, as far as the checks can tell."""
    def make(cap, name):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
        return torch.device("cuda", 0)

    return make


def test_fp8_on_a_gpu_without_fp8_refused(gpu):
    with pytest.raises(UsageError, match=r"--precision fp8 needs compute capability 8.9 .*NVIDIA A100.* has 8\.0"):
        fp8_dtype_from_args(gpu((8, 0), "NVIDIA A100"), None, None)


def test_fp8_dtype_is_bf16_and_other_dtypes_refused(gpu):
    dev = gpu((9, 0), "NVIDIA H200")
    assert fp8_dtype_from_args(dev, None, None) == torch.bfloat16
    assert fp8_dtype_from_args(dev, "bf16", None) == torch.bfloat16
    with pytest.raises(UsageError, match="--precision fp8 with --dtype fp16"):
        fp8_dtype_from_args(dev, "fp16", None)


def test_bench_compiled_fp8_on_a_gpu_without_fp8_refused(capsys, tmp_path, gpu, monkeypatch):
    gpu((8, 6), "NVIDIA RTX A6000")
    monkeypatch.setattr("megafusion.cli.common.resolve_device", lambda name: torch.device("cuda", 0))
    _refused("mf-bench", ["--model", "tiny-sd15", "--device", "cuda", "--steps", "4", "--variants",
                          "compiled,compiled-fp8", "--output", str(tmp_path)], capsys,
             "--variants compiled-fp8 needs compute capability 8.9", "RTX A6000", "8.6")
