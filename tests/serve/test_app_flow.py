"""The Ray Serve application serving tiny-flux with a FLUX ControlNet on this machine's CPU: the flow runtime's
bytes through HTTP (plain and with a control image), and the flow rules' refusals as 400s naming the field."""
from __future__ import annotations

import base64
import json
import os

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from megafusion.serve.config import ServeConfig  # noqa: E402

from .conftest import free_port, get, post, started_here, wait_gone  # noqa: E402

pytestmark = pytest.mark.slow
STAGES = "128x128:2,160x160:1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import serve

    from megafusion.core.families import FAMILIES
    from megafusion.serve.app import deploy
    from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet

    from .test_conditions import png_bytes

    files = tmp_path_factory.mktemp("served-flow")
    (files / "edges.png").write_bytes(png_bytes(2, (128, 128)))
    cn = save_tiny_flow_controlnet(FAMILIES["tiny-flux"], files / "cn", seed=1)
    port = free_port()
    cfg = ServeConfig("tiny-flux", device="cpu", sizes=((160, 160),), max_batch=2, timeout_s=60.0, port=port,
                      controlnets=(str(cn),))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = started_here()
    try:
        deploy(cfg, lambda text: None)
        yield f"http://127.0.0.1:{port}", files
    finally:
        started |= started_here()
        serve.shutdown()
        ray.shutdown()
        left = wait_gone(started)
        assert not left, f"processes left behind after ray.shutdown: {sorted(left)}"


def _reference_png(tmp_path, args: list[str]) -> bytes:
    """mf-generate's PNG with the replica's one thread (Ray sets OMP_NUM_THREADS=1 for its one CPU)."""
    import torch

    from megafusion.cli.generate import main

    out = tmp_path / "ref.png"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--model", "tiny-flux", "--device", "cpu", "--no-progress", "--prompt", "a fox", "--stages",
                     STAGES, "--seed", "5", "--guidance", "2.5", "--output", str(out), *args]) == 0
    finally:
        torch.set_num_threads(threads)
    return out.read_bytes()


def test_models_and_bytes(server, tmp_path):
    url, files = server
    code, _, body = get(url + "/v1/models")
    info = json.loads(body)
    assert code == 200 and info["family"] == "flux" and info["sizes"] == ["160x160"] and info["controlnets"] == 1
    req = {"prompt": "a fox", "stages": STAGES, "seed": 5, "guidance": 2.5}
    code, headers, png = post(url + "/v1/generate", req)
    assert code == 200 and png == _reference_png(tmp_path, [])
    assert json.loads(headers["x-megafusion-plan"]) == {"stages": STAGES, "size": "160x160"}
    edges = base64.b64encode((files / "edges.png").read_bytes()).decode()
    code, _, cpng = post(url + "/v1/generate", {**req, "control_images": [edges], "control_scale": 0.8})
    assert code == 200 and cpng == _reference_png(tmp_path, ["--controlnet", str(files / "cn"), "--control-image",
                                                             str(files / "edges.png"), "--control-scale", "0.8"])
    assert cpng != png


@pytest.mark.parametrize("body,needle", [
    ({"negative_prompt": "blur"}, "negative_prompt \"blur\": tiny-flux is guidance-distilled"),
    ({"dilation": 2}, "dilation 2: tiny-flux is a transformer"),
    ({"control_images": [], "stages": STAGES}, "control_images: 0 images for this server's 1 ControlNet(s)"),
    ({"size": "256x256"}, "size 256x256 is not served here; this server serves 160x160"),
])
def test_flow_refusals_are_400_naming_the_field(server, body, needle):
    code, _, raw = post(server[0] + "/v1/generate", {"prompt": "x", **body})
    assert code == 400 and needle in json.loads(raw)["error"], raw
