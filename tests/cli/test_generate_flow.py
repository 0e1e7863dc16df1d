"""`mf-generate --model tiny-sd3 / tiny-flux`: the flow stage loop from the command line, and its refusals."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from megafusion.cli.generate import main


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_generates_png_of_exact_size(model, tmp_path, capsys):
    out = tmp_path / "fox.png"
    rc = main(["--model", model, "--prompt", "a red fox", "--size", "250x140", "--steps", "4", "--relay", "latent",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "stage 2" in text and "wrote" in text
    image = np.asarray(Image.open(out))
    assert image.shape == (140, 250, 3) and image.std() > 0
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("argv,message", [
    (["--model", "tiny-sd3", "--dilation", "2"], "--dilation 2: tiny-sd3 is a transformer"),
    (["--model", "tiny-flux", "--negative-prompt", "blur"], "guidance-distilled"),
    (["--model", "tiny-flux", "--mode", "compiled", "--device", "cpu"], "--mode compiled needs a CUDA device"),
    (["--model", "tiny-sd3", "--mode", "graphs", "--device", "cpu"], "--mode graphs needs a CUDA device"),
    (["--model", "tiny-sd3", "--size", "64x64"], "smaller than tiny-sd3's native"),
    (["--model", "tiny-sd3", "--stages", "128x128:2,136x136:1"], "not a positive multiple of 16"),
    (["--model", "tiny-flux", "--guidance", "nan"], "--guidance 'nan'"),
])
def test_bad_input_is_one_line_before_any_load(argv, message, tmp_path, capsys):
    rc = main([*argv, "--prompt", "x", "--output", str(tmp_path / "x.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_dry_run_prints_plan_and_cost(capsys):
    assert main(["--model", "sd3", "--prompt", "x", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "1024x1024 x20 -> 2048x2048 x8" in text and "TFLOP" in text
