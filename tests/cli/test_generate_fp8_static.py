"""mf-generate --precision fp8 --fp8-scales static on the torch modules, run on the CPU with the GPU check waived
(torch's `_scaled_mm` runs on the CPU): the UNet's FP8 layers get calibrated scales before the first step, and the
image is written. The compiled path's store of the scales runs on the GPU (the GPU test below)."""
from __future__ import annotations

import pytest

from megafusion.cli import generate as gen_cli

GEN = ["--model", "tiny-sdxl", "--prompt", "x", "--no-progress", "--stages", "128x128:1,160x160:1"]


def test_eager_static_scales(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("megafusion.engine.fp8.fp8_unavailable", lambda device, subject="": "")
    out = tmp_path / "a.png"
    assert gen_cli.main(GEN + ["--device", "cpu", "--mode", "eager", "--precision", "fp8", "--fp8-scales", "static",
                               "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "FP8 static input scales:" in said and "calibrated in" in said and out.is_file(), said


@pytest.mark.gpu
def test_compiled_static_scales_kept_with_the_compile_cache(capsys, tmp_path):
    out, cache = tmp_path / "a.png", tmp_path / "cc"
    args = GEN + ["--device", "cuda", "--mode", "compiled", "--precision", "fp8", "--fp8-scales", "static",
                  "--compile-cache", str(cache), "--output", str(out)]
    assert gen_cli.main(args) == 0
    first = capsys.readouterr().out
    assert "calibrated in" in first and len(list(cache.glob("fp8-scales-*.json"))) == 1
    assert gen_cli.main(args) == 0
    second = capsys.readouterr().out
    assert "loaded from the scale store" in second, second
