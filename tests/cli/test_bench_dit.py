"""mf-bench's refusals for SD3 / FLUX (cli/bench_dit.py): one line naming the bad value, exit 2, before any model
load, nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.cli.refusals import refused


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An SD3 ControlNet, a UNet ControlNet's config, a UNet LoRA, a CLIP (not SigLIP) encoder config, a photo."""
    from safetensors.torch import save_file
    import torch

    from megafusion.core.families import FAMILIES
    from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet

    d = tmp_path_factory.mktemp("dit-refusals")
    sd3cn = str(save_tiny_flow_controlnet(FAMILIES["tiny-sd3"], d / "sd3cn", seed=1))
    (d / "unetcn").mkdir()
    (d / "unetcn" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (d / "clip").mkdir()
    (d / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)},
              str(d / "unet.safetensors"))
    from tests.runtime.test_flow_ipadapter_sd3 import save_tiny_sd3_ip_adapter

    save_tiny_sd3_ip_adapter(FAMILIES["tiny-sd3"].transformer, d / "ip.safetensors")
    (d / "bad.safetensors").write_bytes(b"")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "photo.png")
    return {"SD3CN": sd3cn, "UNETCN": str(d / "unetcn"), "CLIP": str(d / "clip"), "ULORA": str(d / "unet.safetensors"),
            "IP": str(d / "ip.safetensors"), "BADIP": str(d / "bad.safetensors"), "PHOTO": str(d / "photo.png"),
            "DIR": str(d)}


@pytest.mark.parametrize("model, extra, needles", [
    ("tiny-flux", ["--controlnet", "SD3CN", "--control-image", "PHOTO"],
     ["--controlnet", "a SD3ControlNetModel folder; tiny-flux takes a FluxControlNetModel"]),
    ("tiny-sd3", ["--controlnet", "UNETCN", "--control-image", "PHOTO"],
     ["a ControlNetModel folder; tiny-sd3 takes a SD3ControlNetModel"]),
    ("tiny-sd3", ["--controlnet", "SD3CN"], ["1 --controlnet and 0 --control-image"]),
    ("tiny-sd3", ["--image", "/nowhere.png"], ["--image", "/nowhere.png"]),
    ("tiny-flux", ["--image", "PHOTO", "--strength", "1.5"], ["--strength 1.5: must be a number in (0, 1]"]),
    ("tiny-sd3", ["--image", "PHOTO", "--strength", "0"], ["--strength 0.0: must be a number in (0, 1]"]),
    ("tiny-sd3", ["--strength", "0.5"], ["--strength and --start-stage need --image"]),
    ("tiny-sd3", ["--lora", "ULORA"], ["--lora", "unknown key 'unet.down_blocks.0"]),
    ("tiny-sd3", ["--ip-adapter", "IP"], ["--ip-adapter needs --ip-adapter-image FILE and --ip-adapter-encoder DIR"]),
    ("tiny-sd3", ["--ip-adapter", "IP", "--ip-adapter-image", "PHOTO", "--ip-adapter-encoder", "CLIP"],
     ["--ip-adapter-encoder", "SD3's IP-Adapter takes a SigLIP vision model folder"]),
    ("tiny-sd3", ["--ip-adapter", "BADIP", "--ip-adapter-image", "PHOTO", "--ip-adapter-encoder", "CLIP"],
     ["--ip-adapter", "bad.safetensors': not a readable safetensors file"]),
    ("tiny-sd3", ["--variants", "compiled-fp8"],
     ["--variants compiled-fp8: not available for tiny-sd3: 'compiled-fp8'"]),
    ("tiny-flux", ["--variants", "torch,graphs"], ["graphs needs a CUDA device (got cpu)"]),
    ("tiny-sd3", ["--variants", "engines:aoti", "--engine-dir", "/no/such/dir"],
     ["--engine-dir '/no/such/dir': no such folder"]),
    ("tiny-sd3", ["--variants", "engines:aoti", "--engine-dir", "PHOTO"], ["no such folder"]),
    ("tiny-flux", ["--variants", "engines:nope"], ["not available for tiny-flux: 'engines:nope'"]),
    ("tiny-sd3", ["--cold-start", "compiled"], ["--cold-start: mf-bench does not take it for tiny-sd3 yet"]),
    ("tiny-sd3", ["--dilation", "2"], ["--dilation 2: tiny-sd3 is a transformer"]),
    ("tiny-flux", ["--negative-prompt", "blurry"], ["--negative-prompt: tiny-flux is guidance-distilled"]),
    ("tiny-flux", ["--guidance", "nan"], ["--guidance"]),
])
def test_refusals_are_one_line_before_the_load(files, tmp_path, capsys, no_model_load, model, extra, needles):
    extra = [files.get(x, x) for x in extra]
    refused("mf-bench", ["--model", model, "--device", "cpu", "--output", str(tmp_path / "o"), *extra],
            capsys, *needles)
    assert not (tmp_path / "o").exists()
