"""`mf-build-engines --controlnet` and `mf-generate --engines --controlnet` (engine/controlnet_engines.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from megafusion.cli import build_engines as build_cli
from megafusion.cli import generate as gen_cli
from megafusion.core.controlnet_specs import CONTROLNET
from megafusion.engine.cache import EngineCache
from tests.engines import STAGES
from tests.runtime.test_controlnet import save_tiny_controlnet


def _one_line(err: str, needle: str) -> None:
    assert err.count("\n") == 1 and needle in err, err


@pytest.mark.slow
def test_build_then_generate_on_engines_matches_torch_path(tiny_sd15, sd15_control_ort, tmp_path, capsys):
    # The build (the session's plain engines + `mf-build-engines --controlnet` of a tiny ControlNet) and what it
    # printed come from tests/conftest.py, shared with tests/serve; the checks here run on a private copy.
    built, cn, said = sd15_control_ort
    out = tmp_path / "engines"
    shutil.copytree(built, out)
    base = ["--model", "tiny-sd15", "--stages", STAGES, "--device", "cpu"]
    assert "controlnet: 4 built, 0 up to date" in said and "0 built, 5 up to date" in said
    assert len([e for e in EngineCache(out).entries().values() if e.key.network == CONTROLNET]) == 2
    assert build_cli.main([*base, "--controlnet", str(cn), "--networks", "controlnet-dilated", "--output",
                           str(out)]) == 0
    said = capsys.readouterr().out  # that network alone, and none of the plan's others
    assert "controlnet: 0 built, 1 up to date" in said and "manifest" not in said

    edges = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(edges)
    gen = [*base, "--prompt", "a kite", "--no-progress", "--controlnet", str(cn), "--control-image", str(edges),
           "--control-scale", "0.9"]
    on_engines, on_torch = tmp_path / "e.png", tmp_path / "t.png"
    assert gen_cli.main([*gen, "--engines", str(out), "--output", str(on_engines)]) == 0
    assert "onnxruntime engines" in capsys.readouterr().out
    assert gen_cli.main([*gen, "--output", str(on_torch)]) == 0
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (on_engines, on_torch))
    assert np.abs(a - b).max() <= 1  # as tests.engines asks of every engine run

    other = save_tiny_controlnet(tiny_sd15.unet, tmp_path / "other", 6)  # other weights: no entries for it
    bad = tmp_path / "bad.png"
    assert gen_cli.main([*base, "--prompt", "a kite", "--no-progress", "--controlnet", str(other), "--control-image",
                         str(edges), "--engines", str(out), "--output", str(bad)]) == 2
    _one_line(capsys.readouterr().err, f"build them with: mf-build-engines --model tiny-sd15 --stages "
                                       f"128x128:2,256x256:2 --backend onnxruntime --precision fp32 --device cpu "
                                       f"--ort-optimize none --output {out} --controlnet {other}")
    assert not bad.exists()


@pytest.mark.parametrize("extra, needle", [
    (["--backend", "torch"], "ControlNet engines are built for aoti and onnxruntime, not --backend torch"),
    (["--backend", "aoti", "--dynamic"], "static per stage shape; leave out --dynamic"),
    (["--jobs", "2"], "build the ControlNets with --jobs 1"),
])
def test_build_refusals_before_the_load(tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setattr("megafusion.core.loading.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    args = ["--model", "tiny-sd15", "--stages", STAGES, "--device", "cpu", "--output", str(tmp_path / "o")]
    assert build_cli.main([*args, "--controlnet", str(tmp_path / "cn"), *extra]) == 2
    _one_line(capsys.readouterr().err, needle)
    assert build_cli.main([*args, "--controlnet", str(tmp_path / "none")]) == 2
    _one_line(capsys.readouterr().err, "not a diffusers ControlNetModel folder")
    assert build_cli.main([*args, "--networks", "unet,controlnet-dilated"]) == 2
    _one_line(capsys.readouterr().err, "--networks controlnet-dilated: ControlNet networks need --controlnet DIR")


def test_generate_refuses_lora_with_controlnet_engines_before_the_load(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("megafusion.core.loading.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    (tmp_path / "l.safetensors").write_bytes(b"")
    edges = tmp_path / "edges.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(edges)
    out = tmp_path / "x.png"
    assert gen_cli.main(["--model", "tiny-sd15", "--prompt", "a kite", "--device", "cpu", "--controlnet",
                         str(tmp_path / "cn"), "--control-image", str(edges), "--engines", str(tmp_path),
                         "--lora", str(tmp_path / "l.safetensors"), "--output", str(out)]) == 2
    _one_line(capsys.readouterr().err, "the ControlNet engines hold the base UNet")
    assert not out.exists()


def test_build_refuses_controlnet_for_pixel_models(tmp_path, capsys):
    assert build_cli.main(["--model", "tiny-if", "--controlnet", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    _one_line(capsys.readouterr().err, "tiny-if has no ControlNet engines")
