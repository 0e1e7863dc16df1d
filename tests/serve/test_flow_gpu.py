"""mf-serve's SD3 / FLUX replica on CUDA (skipped without it): the default mode (the flow runtime's CUDA graphs, bf16),
warmed at the served size, then requests whose ControlNet images and scales change per request, each compared with
mf-generate's image for the same flags in this process: within two levels per pixel (the same bf16 kernels run; a
captured graph and an eager launch may still pick other algorithms, and bf16 rounds more coarsely than fp16)."""
from __future__ import annotations

import pytest
import torch

from megafusion.serve.request import parse_request

from .test_conditions import b64, png_bytes
from .test_conditions_gpu import pixels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
STAGES = "128x128:2,160x160:2"


def mf_generate(tmp_path, model: str, args: list[str]) -> bytes:
    from megafusion.cli.generate import main

    out = tmp_path / "ref.png"
    out.unlink(missing_ok=True)
    assert main(["--model", model, "--device", "cuda", "--no-progress", "--prompt", "a fox", "--stages", STAGES,
                 "--seed", "3", "--output", str(out), *args]) == 0
    return out.read_bytes()


def close(a: bytes, b: bytes, levels: int = 2) -> bool:
    return a == b or int(abs(pixels(a) - pixels(b)).max()) <= levels


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_served_under_cuda_graphs_is_mf_generates_image(model, tmp_path):
    from megafusion.core.families import FAMILIES
    from megafusion.serve.config import ServeConfig, check_config
    from megafusion.serve.flow_model import FlowModelServer
    from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet

    cn = str(save_tiny_flow_controlnet(FAMILIES[model], tmp_path / "cn", seed=1))
    for i in (1, 2):
        (tmp_path / f"c{i}.png").write_bytes(png_bytes(i, (128, 128)))
    server = FlowModelServer(check_config(ServeConfig(model, device="cuda", sizes=((160, 160),), controlnets=(cn,))))
    assert server.mode == "graphs" and server.precision == "bf16"
    server.warm_up()

    def served(**fields) -> bytes:
        body = {"prompt": "a fox", "stages": STAGES, "seed": 3, **fields}
        return server.generate(parse_request(body, server.family, server.cfg.served_sizes, server.offered)).png

    plain = served()
    assert close(plain, mf_generate(tmp_path, model, []))
    for i, scale in ((1, 0.8), (2, 1.5)):  # a second image and scale into the graphs captured for the first
        got = served(control_images=[b64((tmp_path / f"c{i}.png").read_bytes())], control_scale=scale)
        ref = mf_generate(tmp_path, model, ["--controlnet", cn, "--control-image", str(tmp_path / f"c{i}.png"),
                                            "--control-scale", str(scale)])
        assert close(got, ref) and not close(got, plain, 0)
    assert close(served(), plain, 0)  # the plain graphs are untouched by the controlled ones
