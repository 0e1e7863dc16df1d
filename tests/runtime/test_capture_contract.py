"""What may run inside the runtime's CUDA graphs is declared, never assumed: every runner says whether it can
be captured (as its backend's `capture_note` says), `Networks` exposes it with the dtypes the pipeline reads,
the graphed path refuses what cannot be captured, and `mf-generate` falls back (by default) or refuses (when
graphs were asked for), saying why. On CUDA every backend runs under the default mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.cli.generate import main as generate
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine.backend import registry
from megafusion.engine.load import open_engines
from megafusion.engine.torch_backend import ModuleRunner
from megafusion.runtime.graphs import GraphedDenoiser, NotCapturableError
from megafusion.runtime.pipeline import GenerationOptions

from tests.engines import STAGES, assert_generation_matches_torch, build


def test_every_backend_states_its_capture_rule():
    notes = {name: b.capture_note for name, b in registry().items()}
    assert set(notes) == {"onnxruntime", "tensorrt", "torch", "aoti"}
    assert notes["onnxruntime"] and "stream" in notes["onnxruntime"]
    assert notes["torch"] == notes["aoti"] == notes["tensorrt"] == ""
    kinds = {name: b.profile_kind for name, b in registry().items()}
    assert kinds == {"onnxruntime": "stage", "tensorrt": "stage", "torch": "stage", "aoti": "stage"}


def test_runners_declare_what_their_backend_says(tiny_sd15, sd15_engines, tmp_path):
    plan = validate_plan(tiny_sd15.family, parse_stages(STAGES))
    ort, _ = open_engines(sd15_engines, tiny_sd15, plan)
    assert ort.backend == "onnxruntime" and not ort.capturable
    assert not any(r.capturable for r in ort.runners.values())
    assert ort.unet_dtype == torch.float32 and ort.vae_dtype == torch.float32
    build(tiny_sd15, tmp_path, backend="torch")
    mods, _ = open_engines(tmp_path, tiny_sd15, plan)
    assert mods.backend == "torch" and mods.capturable
    assert all(isinstance(r, ModuleRunner) for r in mods.runners.values())


def test_torch_entries_run_the_modules_themselves(tiny_sdxl, tmp_path):
    build(tiny_sdxl, tmp_path, backend="torch")
    plan = validate_plan(tiny_sdxl.family, parse_stages(STAGES))
    nets, desc = open_engines(tmp_path, tiny_sdxl, plan)
    assert desc.startswith("torch engines")
    assert_generation_matches_torch(tiny_sdxl, nets, plan, GenerationOptions("a red cube", seed=5), "torch entries: ")


def test_graphed_denoiser_refuses_networks_that_cannot_be_captured(tiny_sd15, sd15_engines):
    plan = validate_plan(tiny_sd15.family, parse_stages(STAGES))
    nets, _ = open_engines(sd15_engines, tiny_sd15, plan)
    with pytest.raises(NotCapturableError, match="EngineNetworks cannot run inside a CUDA graph capture"):
        GraphedDenoiser(nets, torch.device("cpu"), capture=True)
    assert GraphedDenoiser(nets, torch.device("cpu"), capture=False).captures == 0  # the eager buffered step


def _has_ort_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "aoti", "onnxruntime"])
def test_default_cuda_mode_runs_every_backend(backend, tmp_path, capsys):
    from megafusion.cli.build_engines import main as build_engines

    if backend == "onnxruntime" and not _has_ort_cuda():
        pytest.skip("onnxruntime-gpu is not installed (its CUDA EP is needed for --device cuda engines)")
    eng = tmp_path / "engines"
    # ORT's CUDA fusions (BiasSplitGelu) take only real-size hidden widths: tiny models build unfused.
    fusion = ["--ort-optimize", "none"] if backend == "onnxruntime" else []
    assert build_engines(["--model", "tiny-sd15", "--stages", STAGES, "--backend", backend, "--device", "cuda",
                          *fusion, "--output", str(eng)]) == 0
    common = ["--model", "tiny-sd15", "--engines", str(eng), "--stages", STAGES, "--device", "cuda",
              "--prompt", "a red cube", "--seed", "3", "--no-progress"]
    capsys.readouterr()
    assert generate([*common, "--output", str(tmp_path / "default.png")]) == 0
    said = capsys.readouterr().out
    if registry()[backend].capture_note:
        assert "cannot run inside the runtime's CUDA graphs" in said and "running the stages eagerly" in said
        assert generate([*common, "--mode", "graphs", "--output", str(tmp_path / "g.png")]) == 2
        err = capsys.readouterr().err
        assert "--mode graphs:" in err and "use --mode eager" in err and not (tmp_path / "g.png").exists()
    else:
        assert "mode graphs" in said
    assert generate([*common, "--mode", "eager", "--output", str(tmp_path / "eager.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "default.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "eager.png")).astype(int)
    assert a.shape == b.shape == (256, 256, 3)
    assert np.abs(a - b).max() <= 2, "graphed and eager runs of the same engines differ"  # TF32/cuDNN choices
    assert b.std() > 1.0  # a real image, not a constant
