"""`--precision fp8` (mf-generate, mf-build-engines) and `--variants compiled-fp8` / `engines:aoti-fp8` (mf-bench)
are refused in one line, exit status 2, before any model load, where FP8 cannot run: the torch modules on the CPU, a
GPU without FP8 tensor cores, a backend that builds no FP8 engines, a folder without FP8 engines for the plan, a
non-bf16 dtype, conditions the FP8 packages do not take. FP8 aoti packages themselves: tests/engine/test_aoti_fp8.py."""
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


def test_generate_fp8_engines_missing_names_the_build(capsys, tmp_path):
    """A folder without FP8 engines: the command that builds them (aoti, the one backend that does), before the
    load; FP8 engines run on the CPU (torch's `_scaled_mm`), so the CPU is no reason to refuse here."""
    (tmp_path / "e").mkdir()
    _refused("mf-generate", GEN + ["--device", "cpu", "--precision", "fp8", "--engines", str(tmp_path / "e"),
                                   "--output", str(tmp_path / "a.png")],
             capsys, "no tiny-sdxl fp8 engines in", "build them with: mf-build-engines --model tiny-sdxl",
             "--backend aoti --precision fp8 --device cpu")


@pytest.mark.parametrize("flags,said", [(["--lora", "x.safetensors"], "--lora with --engines and --precision fp8"),
                                        (["--controlnet", "cn"], "--controlnet with --engines and --precision fp8")])
def test_generate_fp8_engines_with_conditions_refused(capsys, tmp_path, monkeypatch, flags, said):
    monkeypatch.setattr("megafusion.cli.generate.controls_from_args", lambda args: ["cn"] if args.controlnet else [])
    monkeypatch.setattr("megafusion.cli.generate.loras_from_args", lambda v: list(v))
    _refused("mf-generate", GEN + ["--device", "cpu", "--precision", "fp8", "--engines", str(tmp_path), *flags,
                                   "--output", str(tmp_path / "a.png")], capsys, said, "plain UNet")


def test_generate_unknown_precision_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's choice check
        gen_cli.main(GEN + ["--precision", "int4", "--output", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--precision: invalid choice: 'int4'" in err, err


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_build_engines_fp8_refused_for_backends_without_it(capsys, tmp_path, backend):
    """The backend's declared precisions (`check_request`) refuse it, before the model load."""
    _refused("mf-build-engines", ["--model", "tiny-sd15", "--device", "cpu", "--stages", "128x128:1", "--backend",
                                  backend, "--precision", "fp8", "--output", str(tmp_path / "e")], capsys,
             f"--precision fp8: backend {backend} builds fp32, fp16, not 'fp8'")
    assert not (tmp_path / "e").exists()


def test_only_aoti_declares_fp8():
    from megafusion.engine.backend import registry

    assert [name for name, b in registry().items() if "fp8" in b.precisions] == ["aoti"]
    with pytest.raises(ValueError, match="backend tensorrt builds fp32, fp16, not 'fp8'"):
        registry()["tensorrt"].check_request("fp8", "none", "cuda")


def test_build_engines_fp8_on_a_gpu_without_fp8_refused(capsys, tmp_path, gpu, monkeypatch):
    gpu((8, 0), "NVIDIA A100")
    monkeypatch.setattr("megafusion.cli.common.resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr("megafusion.cli.build_engines.check_backend", lambda backend, device: None)
    _refused("mf-build-engines", ["--model", "tiny-sd15", "--device", "cuda", "--stages", "128x128:1", "--backend",
                                  "aoti", "--precision", "fp8", "--output", str(tmp_path / "e")], capsys,
             "--precision fp8: --precision fp8 needs compute capability 8.9", "NVIDIA A100 has 8.0")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("flag,value", [("--controlnet", "cn"), ("--ip-adapter", "ip.safetensors")])
def test_build_engines_fp8_with_conditions_refused(capsys, tmp_path, flag, value):
    _refused("mf-build-engines", ["--model", "tiny-sd15", "--device", "cpu", "--stages", "128x128:1", "--backend",
                                  "aoti", "--precision", "fp8", flag, value, "--output", str(tmp_path / "e")], capsys,
             f"--precision fp8 with {flag}: FP8 packages are built for the plain UNet only")


def test_build_engines_fp8_for_transformers_refused(capsys, tmp_path):
    _refused("mf-build-engines", ["--model", "tiny-flux", "--device", "cpu", "--backend", "aoti", "--precision",
                                  "fp8", "--output", str(tmp_path / "e")], capsys, "--precision fp8")


def test_bench_fp8_engines_with_a_lora_refused(capsys, tmp_path):
    (tmp_path / "e").mkdir()
    _refused("mf-bench", ["--model", "tiny-sd15", "--device", "cpu", "--steps", "4", "--variants", "engines:aoti-fp8",
                          "--engine-dir", str(tmp_path / "e"), "--lora", str(tmp_path / "l.safetensors"),
                          "--output", str(tmp_path / "o")], capsys, "--lora with --variants engines:aoti-fp8")


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


def test_bench_fp8_engines_on_a_gpu_without_fp8_refused(capsys, tmp_path, gpu, monkeypatch):
    gpu((8, 6), "NVIDIA RTX A6000")
    monkeypatch.setattr("megafusion.cli.common.resolve_device", lambda name: torch.device("cuda", 0))
    (tmp_path / "e").mkdir()
    _refused("mf-bench", ["--model", "tiny-sd15", "--device", "cuda", "--steps", "4", "--variants",
                          "engines:aoti,engines:aoti-fp8", "--engine-dir", str(tmp_path / "e"), "--output",
                          str(tmp_path / "o")], capsys, "--variants engines:aoti-fp8 needs compute capability 8.9")


def test_bench_compiled_fp8_on_a_gpu_without_fp8_refused(capsys, tmp_path, gpu, monkeypatch):
    gpu((8, 6), "NVIDIA RTX A6000")
    monkeypatch.setattr("megafusion.cli.common.resolve_device", lambda name: torch.device("cuda", 0))
    _refused("mf-bench", ["--model", "tiny-sd15", "--device", "cuda", "--steps", "4", "--variants",
                          "compiled,compiled-fp8", "--output", str(tmp_path)], capsys,
             "--variants compiled-fp8 needs compute capability 8.9", "RTX A6000", "8.6")


@pytest.mark.parametrize("flags,said", [
    (["--fp8-scales", "static"], "--fp8-scales static needs --precision fp8"),
    (["--fp8-scales", "token", "--device", "cpu"], "--fp8-scales token needs --precision fp8"),
])
def test_generate_fp8_scales_without_fp8_refused(capsys, tmp_path, flags, said):
    _refused("mf-generate", GEN + flags + ["--output", str(tmp_path / "a.png")], capsys, said)
    assert not list(tmp_path.iterdir())


def test_generate_static_scales_engines_missing_names_the_build(capsys, tmp_path):
    (tmp_path / "e").mkdir()
    _refused("mf-generate", GEN + ["--device", "cpu", "--precision", "fp8", "--fp8-scales", "static", "--engines",
                                   str(tmp_path / "e"), "--output", str(tmp_path / "a.png")], capsys,
             "no tiny-sdxl fp8 engines in", "--backend aoti --precision fp8 --fp8-scales static --device cpu")


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-if"])
def test_generate_static_scales_for_other_families_refused(capsys, tmp_path, model):
    _refused("mf-generate", ["--model", model, "--prompt", "x", "--no-progress", "--fp8-scales", "static",
                             "--output", str(tmp_path / "a.png")], capsys, "--fp8-scales is for the SD1.5 and SDXL")


def test_bench_two_fp8_compiled_variants_refused(capsys, tmp_path, gpu, monkeypatch):
    gpu((9, 0), "NVIDIA H200")
    monkeypatch.setattr("megafusion.cli.common.resolve_device", lambda name: torch.device("cuda", 0))
    _refused("mf-bench", ["--model", "tiny-sd15", "--device", "cuda", "--steps", "4", "--variants",
                          "compiled-fp8,compiled-fp8-static", "--output", str(tmp_path / "o")], capsys,
             "compiled-fp8 and compiled-fp8-static both quantize the shared UNet in place")



@pytest.mark.parametrize("flags,said", [
    (["--precision", "fp16", "--fp8-scales", "static"], "--fp8-scales static needs --precision fp8, not --precision fp16"),
    (["--precision", "fp8", "--fp8-scales", "static", "--dynamic"], "--fp8-scales static with --dynamic"),
])
def test_build_engines_static_scales_refusals(capsys, tmp_path, flags, said):
    _refused("mf-build-engines", ["--model", "tiny-sd15", "--device", "cpu", "--stages", "128x128:1", "--backend",
                                  "aoti", *flags, "--output", str(tmp_path / "e")], capsys, said)
    assert not (tmp_path / "e").exists()
