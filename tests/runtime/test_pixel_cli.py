"""`mf-generate --model tiny-if`: the IF path through the CLI (short plans, CPU)."""
from __future__ import annotations

import pytest
from PIL import Image

from megafusion.cli.generate import main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_if_writes_the_stage_two_image(tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["--model", "tiny-if", "--prompt", "a red fox", "--stages", "16x16:3,32x32:2",
                 "--stages-2", "64x64:2,128x128:1", "--seed", "1", "--output", str(out)]) == 0
    assert Image.open(out).size == (128, 128)
    text = capsys.readouterr().out
    assert "stage II.2 (128x128, 1 steps)" in text and "wrote" in text


@pytest.mark.parametrize("extra, message", [
    (["--size", "64x64"], "--size does not apply to tiny-if"),
    (["--stages", "18x18:3"], "multiples of 4"),
    (["--stages-2", " "], "--stages-2 ' ': give at least one stage"),
    (["--relay", "latent"], "its relay is in pixels"),
    (["--guidance-2", "nan"], "--guidance-2"),
    (["--stage-2-path", "/nowhere"], "--stage-2-path needs --model-path"),
    ([], "--model if needs --model-path DIR (an IFPipeline folder) or --random-weights"),
])
def test_bad_input_is_one_line_and_no_file(tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    model = "if" if "--model-path DIR" in message else "tiny-if"
    assert main(["--model", model, "--prompt", "x", "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_mode_other_than_eager_needs_cuda(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["--model", "tiny-if", "--prompt", "x", "--mode", "graphs", "--device", "cpu",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--mode graphs needs a CUDA device (got cpu)") and len(err.splitlines()) == 1
    assert not out.exists()
