"""The server's conditions on CUDA (skipped without it): --precision fp8 and per-request ControlNet images under
the runtime's CUDA graphs (a graph captured for the first request must see the next request's images and scales).
Each served image is compared with mf-generate's for the same flags in this process: within one level per pixel
(the same kernels run; a captured graph and an eager launch may still pick different algorithms)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from megafusion.serve.request import parse_request

from .test_conditions import STAGES, b64, png_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def mf_generate(tmp_path, args: list[str]) -> bytes:
    from megafusion.cli.generate import main

    out = tmp_path / "ref.png"
    assert main(["--model", "tiny-sd15", "--device", "cuda", "--no-progress", "--prompt", "a cube", "--stages",
                 STAGES, "--seed", "3", "--output", str(out), *args]) == 0
    return out.read_bytes()


def close(a: bytes, b: bytes) -> bool:
    return a == b or int(np.abs(pixels(a) - pixels(b)).max()) <= 1


def test_fp8_server_is_mf_generates_image(tmp_path):
    from megafusion.engine.fp8 import fp8_unavailable
    from megafusion.serve.config import ServeConfig
    from megafusion.serve.model import ModelServer

    if fp8_unavailable("cuda"):
        pytest.skip(fp8_unavailable("cuda"))
    server = ModelServer(ServeConfig("tiny-sd15", device="cuda", precision="fp8", sizes=((256, 256),)))
    assert server.mode == "graphs" and server.describe()["precision"] == "fp8"
    got = server.generate(parse_request({"prompt": "a cube", "stages": STAGES, "seed": 3}, server.family)).png
    assert close(got, mf_generate(tmp_path, ["--precision", "fp8"]))


def test_controlnet_images_change_per_request_under_graphs(tiny_sd15, tmp_path):
    from tests.runtime.test_controlnet import save_tiny_controlnet

    from megafusion.serve.config import ServeConfig
    from megafusion.serve.model import ModelServer

    cn = save_tiny_controlnet(tiny_sd15.unet, tmp_path / "cn")
    server = ModelServer(ServeConfig("tiny-sd15", device="cuda", sizes=((256, 256),), controlnets=(str(cn),)))
    assert server.mode == "graphs"
    server.warm_up()
    seen = []
    for seed, scale in ((2, 0.8), (5, 1.3)):
        (tmp_path / "edges.png").write_bytes(png_bytes(seed))
        body = {"prompt": "a cube", "stages": STAGES, "seed": 3, "control_images": [b64(png_bytes(seed))],
                "control_scale": scale}
        got = server.generate(parse_request(body, server.family, offered=server.offered)).png
        ref = mf_generate(tmp_path, ["--controlnet", str(cn), "--control-image", str(tmp_path / "edges.png"),
                                     "--control-scale", str(scale)])
        assert close(got, ref), seed
        seen.append(got)
    assert seen[0] != seen[1]
