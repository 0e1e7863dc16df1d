"""`mf-generate`: writes exactly the requested PNG, reproduces diffusers from a saved folder, clear errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.cli.generate import main
from tests.core.test_loading import _save


def test_generates_png_of_exact_size(tmp_path, capsys):
    out = tmp_path / "fox.png"
    rc = main(["--model", "tiny-sdxl", "--prompt", "a red fox", "--size", "320x180", "--steps", "6",
               "--seed", "0", "--output", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "plan: " in text and "stage 2" in text and "wrote" in text
    assert Image.open(out).size == (320, 180)
    assert not list(tmp_path.glob(".*tmp"))


def test_one_stage_from_saved_folder_reproduces_diffusers(tiny_sd15, tmp_path):
    pipe = _save(tiny_sd15, tmp_path / "model")
    out = tmp_path / "ours.png"
    rc = main(["--model", "tiny-sd15", "--model-path", str(tmp_path / "model"), "--prompt", "a lighthouse",
               "--stages", "128x128:8", "--seed", "4", "--output", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    from diffusers import StableDiffusionPipeline

    ref_pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), safety_checker=None,
                                                       requires_safety_checker=False)
    ref = ref_pipe("a lighthouse", height=128, width=128, num_inference_steps=8, guidance_scale=7.0,
                   generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    ours = np.asarray(Image.open(out))
    assert np.abs(ours.astype(int) - (ref * 255).round().astype(int)).max() <= 1
    del pipe


@pytest.mark.parametrize("args,needle", [
    (["--stages", "128x128:0"], "0 steps"),
    (["--stages", "128x128:-2"], "-2 steps"),
    (["--steps", "0"], "--steps 0"),
    (["--size", "64x64"], "64x64"),
    (["--stages", "256x256:5,128x128:5"], "smaller than stage 1"),
    (["--size", "19x20x"], "malformed size '19x20x'"),
    (["--model", "sd9"], "unknown model 'sd9'"),
    (["--model", "sd15", "--model-path", "/no/such/dir"], "'/no/such/dir' does not exist"),
    (["--output", "/no/such/dir/x.png"], "output folder '/no/such/dir' does not exist"),
    (["--dilation", "0"], "--dilation 0: must be at least 1"),
    (["--mode", "compiled", "--inductor", "fastest"], "unknown Inductor set 'fastest'"),
    (["--inductor", "tuned"], "--inductor tuned needs --mode compiled"),
    (["--mode", "fast-graphs", "--device", "cpu"], "--mode fast-graphs needs a CUDA device"),
    (["--mode", "fast-graphs", "--engines", "/no/such/dir"], "with --engines use --mode graphs"),
    (["--mode", "fast-graphs", "--model", "tiny-sd3"], "for tiny-sd3 use --mode graphs or compiled"),
    (["--mode", "fast-graphs", "--model", "tiny-if"], "for tiny-if use --mode graphs or compiled"),
    (["--guidance-2", "3"], "--guidance-2 applies to the IF models (tiny-if, if) only, not tiny-sdxl"),
    (["--model", "tiny-sd3", "--stages-2", "128x128:2"], "--stages-2 applies to the IF models"),
    (["--model", "tiny-sd15", "--stage-2-path", "/tmp"], "--stage-2-path applies to the IF models"),
])
def test_bad_input_one_clear_line(args, needle, capsys):
    rc = main(["--prompt", "x", "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0] and err[0].startswith("mf-generate: error:")


def test_no_traceback_from_the_console_entry():
    r = subprocess.run([sys.executable, "-m", "megafusion.cli.generate", "--prompt", "x", "--size", "1920"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "malformed size '1920'" in r.stderr


def test_console_entry_ends_after_a_complete_image_and_output(tmp_path):
    """`python -m megafusion.cli.generate` ends the process at once after the image (cli/common.py exit_now): the
    PNG is whole, no temporary file is left, and the output was flushed to its last line."""
    from PIL import Image

    out = tmp_path / "o.png"
    r = subprocess.run([sys.executable, "-m", "megafusion.cli.generate", "--model", "tiny-sd15", "--stages",
                        "128x128:2,256x256:2", "--prompt", "a cat", "--no-progress", "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == f"wrote {out} (256x256)"
    assert Image.open(out).size == (256, 256) and [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_segments_are_shown_as_they_end(tmp_path, capsys, monkeypatch):
    """The relays and the decode take seconds with no step to count: each segment is printed when it ends, so
    the relay's line is out before the final decode starts."""
    from megafusion.engine.networks import TorchNetworks

    printed, decode = [], TorchNetworks.vae_decode

    def spy(self, latents):
        printed.append(capsys.readouterr().out)
        return decode(self, latents)

    monkeypatch.setattr(TorchNetworks, "vae_decode", spy)
    assert main(["--model", "tiny-sd15", "--prompt", "a red cube", "--stages", "128x128:2,256x256:1",
                 "--output", str(tmp_path / "p.png")]) == 0
    assert len(printed) == 2  # the relay's decode, then the final one
    assert "stage 1 (128x128" in printed[0] and "relay 1->2" not in printed[0] and "relay 1->2" in printed[1]
