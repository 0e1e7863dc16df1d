"""libmegafusion on a folder built with `mf-build-engines --backend aoti --lora FILE` (issue #18 item 5): the
LoRA is fused into the UNet and text encoder packages and models.json records the fused fingerprints, so the C
API serves the folder as it is (it swaps no LoRA itself): its image is Python's on the same folder and LoRA,
within 1 level, and not the image without the LoRA.

Builds the LoRA's text encoder and UNet packages into a copy of the session's tiny-sd15 folder (three
AOTInductor compiles; the VAE packages are the copy's, as the LoRA leaves the VAE alone)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from megafusion.cli import build_engines as build_cli
from megafusion.core.loading import load_model

from ..conftest import AOTI_STAGES
from ..core.test_lora import _random_lora, save_diffusers
from .test_libmegafusion import cpp_build  # noqa: F401 (the fixture)
from .test_libmegafusion_inputs import _close, _cpp, _python

pytestmark = pytest.mark.slow


def test_lora_folder_is_served_as_built(cpp_build, sd15_aoti, tmp_path):
    lora = save_diffusers(_random_lora(load_model("tiny-sd15")), tmp_path / "style.safetensors")
    out = tmp_path / "engines"
    shutil.copytree(sd15_aoti, out)
    assert build_cli.main(["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti", "--dynamic",
                           "--device", "cpu", "--lora", f"{lora}:0.7", "--networks", "unet,text_encoder",
                           "--output", str(out)]) == 0
    plain = json.loads((sd15_aoti / "models.json").read_text())["models"]["tiny-sd15"]["weights"]
    fused = json.loads((out / "models.json").read_text())["models"]["tiny-sd15"]["weights"]
    assert fused["unet"] != plain["unet"] and fused["text_encoder"] != plain["text_encoder"]
    assert fused["vae_decoder"] == plain["vae_decoder"]

    cpp, r = _cpp(cpp_build, out, tmp_path)
    assert r.returncode == 0, r.stderr
    _close(cpp, _python(out, tmp_path, "--lora", f"{lora}:0.7"))
    without, _ = _cpp(cpp_build, sd15_aoti, tmp_path)
    assert np.abs(without.astype(int) - cpp.astype(int)).max() > 10  # the LoRA is in the image
