"""One replica's model without Ray (serve/model.py): the PNG bytes mf-generate writes, warm-up, and work that
stops between steps."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.families import get_family
from megafusion.serve.config import ServeConfig
from megafusion.core.specs import default_dtype
from megafusion.serve.model import Cancelled, ModelServer, warmup_plan
from megafusion.serve.request import parse_request


@pytest.fixture(scope="module")
def server():
    return ModelServer(ServeConfig("tiny-sd15", sizes=((256, 256),)))


def test_png_bytes_are_mf_generates(server, tmp_path):
    from megafusion.cli.generate import main

    args = {"prompt": "a red cube", "negative_prompt": "blur", "stages": "128x128:2,256x256:2", "seed": 11,
            "guidance": 5.5, "relay": "latent", "dilation": 3}
    out = tmp_path / "ref.png"
    assert main(["--model", "tiny-sd15", "--prompt", "a red cube", "--negative-prompt", "blur", "--stages",
                 "128x128:2,256x256:2", "--seed", "11", "--guidance", "5.5", "--relay", "latent", "--dilation", "3",
                 "--device", "cpu", "--no-progress", "--output", str(out)]) == 0
    got = server.generate(parse_request(args, server.family))
    assert got.png == out.read_bytes()
    assert got.plan_info == {"stages": "128x128:2,256x256:2", "size": "256x256"}
    assert list(got.timings_ms)[0] == "text encoders" and got.seed == 11


def test_warm_up_runs_each_size_with_the_default_shapes(server):
    plan = warmup_plan(get_family("tiny-sd15"), 256, 256)
    assert [(s.width, s.height, s.steps) for s in plan.stages] == [(128, 128, 1), (192, 192, 1), (256, 256, 1)]
    sizes = server.warm_up()
    assert [s for s, _ in sizes] == ["256x256"]


def test_warm_up_runs_the_served_controlnets_at_each_size(tiny_sd15, tmp_path):
    """A server with a ControlNet warms its controlled step too (graphs and compiled code of its own): after the
    warm-up the ControlNet's image buffers exist for every stage shape of each size's default plan."""
    from tests.runtime.test_controlnet import save_tiny_controlnet

    cn = save_tiny_controlnet(tiny_sd15.unet, tmp_path / "cn")
    server = ModelServer(ServeConfig("tiny-sd15", sizes=((256, 256),), controlnets=(str(cn),)))
    controlled = server.conditions.controlled
    assert controlled.images == {}
    assert [s for s, _ in server.warm_up()] == ["256x256"]
    assert set(controlled.images) == {(2, 16, 16), (2, 24, 24), (2, 32, 32)}  # CFG batch, latent h, w per stage


def test_work_stops_between_steps(server):
    asked = []

    def stop_at_third():
        asked.append(1)
        return len(asked) >= 3  # once before the request, then after each step

    req = parse_request({"prompt": "x", "stages": "128x128:50"}, server.family)
    with pytest.raises(Cancelled, match="stage 1, step 2"):
        server.generate(req, stop_at_third)
    assert len(asked) == 3
    with pytest.raises(Cancelled, match="before it started"):
        server.generate(req, lambda: True)


def test_dtype_rules_are_mf_generates():
    from megafusion.cli import common

    for dev, dtype in (("cpu", torch.float32), ("cuda", torch.float16)):
        assert default_dtype(torch.device(dev)) == dtype == common.model_dtype(torch.device(dev), None)


@pytest.mark.slow
def test_engines_png_bytes_are_mf_generates(sd15_engines, tmp_path):
    """--engines: the request runs on the engines opened for its plan (kept for the next one), and the PNG is
    mf-generate --engines' PNG."""
    from megafusion.cli.generate import main

    server = ModelServer(ServeConfig("tiny-sd15", engines=str(sd15_engines), sizes=((256, 256),)))
    req = parse_request({"prompt": "a cube", "stages": "128x128:2,256x256:2", "seed": 5}, server.family)
    got = server.generate(req)
    out = tmp_path / "ref.png"
    assert main(["--model", "tiny-sd15", "--engines", str(sd15_engines), "--prompt", "a cube", "--stages",
                 "128x128:2,256x256:2", "--seed", "5", "--device", "cpu", "--no-progress", "--output", str(out)]) == 0
    assert got.png == out.read_bytes()
    assert "onnxruntime engines" in server.describe()["engines"]
    assert server.generate(req).png == got.png and len(server._engines) == 1  # the opened engines are reused
    # the UNet engines cover the CFG batch of 2: one request per UNet call, and a larger group is refused
    assert server.batch_limit(req) == 1
    assert server.batch_limit(parse_request({"prompt": "x", "stages": "128x128:2,256x256:2", "guidance": 1.0},
                                            server.family)) == 2
    from megafusion.serve.model import ServeModelError as _Refused

    with pytest.raises(_Refused, match="needs a UNet batch of 4; the onnxruntime UNet engines cover batches up to 2"):
        server.generate_group([req, req])
    from megafusion.serve.model import ServeModelError

    with pytest.raises(ServeModelError, match="do not cover"):  # a dilation the engines were not built for
        server.generate(parse_request({"prompt": "x", "stages": "128x128:1,256x256:1", "dilation": 3},
                                      server.family))


@pytest.mark.slow
def test_fp8_engines_png_bytes_are_mf_generates(tmp_path):
    """--engines with --precision fp8: the folder's FP8 UNet package (tests/conftest.py builds it; the CPU runs it),
    and the PNG is mf-generate --engines --precision fp8's."""
    from megafusion.cli.generate import main

    from tests.background import BUILDS

    BUILDS.get("aoti_fp8")
    folder = BUILDS.folder("aoti-fp8")
    server = ModelServer(ServeConfig("tiny-sd15", engines=str(folder), precision="fp8", sizes=((128, 128),)))
    req = parse_request({"prompt": "a cube", "stages": "128x128:2", "seed": 5}, server.family)
    got = server.generate(req)
    out = tmp_path / "ref.png"
    assert main(["--model", "tiny-sd15", "--engines", str(folder), "--precision", "fp8", "--prompt", "a cube",
                 "--stages", "128x128:2", "--seed", "5", "--device", "cpu", "--no-progress", "--output",
                 str(out)]) == 0
    assert got.png == out.read_bytes()
    assert "aoti engines (fp8)" in server.describe()["engines"] and server.describe()["precision"] == "fp8"


def _req(server, **over):
    return parse_request({"prompt": "a cube", "stages": "128x128:2,256x256:1", **over}, server.family)


def test_requests_alike_are_grouped_up_to_the_limit(server):
    from megafusion.serve.model import group_requests

    reqs = [_req(server, seed=0), _req(server, seed=1, guidance=5.0), _req(server, seed=2, prompt="b"),
            _req(server, seed=3), _req(server, seed=4, guidance=5.0)]
    assert group_requests(reqs, lambda r: 4) == [[0, 2, 3], [1, 4]]
    assert group_requests(reqs, lambda r: 2) == [[0, 2], [3], [1, 4]]
    assert group_requests(reqs, lambda r: 1) == [[0], [2], [3], [1], [4]]
    assert server.batch_limit(reqs[0]) == server.cfg.max_batch  # torch modules: no cover below --max-batch


def test_a_group_is_denoised_together_and_each_image_is_close_to_alone(server):
    """Two requests in one UNet batch: each image within 1 level of its image alone (tests/runtime/test_batch.py
    says why not bytes); a group of one is the image alone, bytes equal."""
    import io

    import numpy as np
    from PIL import Image

    reqs = [_req(server, seed=21, prompt="a red cube", relay="latent"),
            _req(server, seed=22, negative_prompt="blur", relay="latent")]
    together = server.generate_group(reqs)
    for r, g in zip(reqs, together):
        alone = server.generate(r)
        a, b = (np.asarray(Image.open(io.BytesIO(x.png)), dtype=np.int16) for x in (alone, g))
        assert np.abs(a - b).max() <= 1 and g.seed == r.options.seed
        assert list(g.timings_ms) == list(alone.timings_ms)
    assert together[0].png != together[1].png
    assert server.generate_group(reqs[1:])[0].png == alone.png  # reqs[1] alone, from the loop


def test_a_group_stops_only_when_every_request_would(server):
    reqs = [_req(server, stages="128x128:40"), _req(server, stages="128x128:40", seed=1)]
    asked = []

    def stop_at_third():
        asked.append(1)
        return len(asked) >= 3  # once before the group, then after each step

    with pytest.raises(Cancelled, match="stage 1, step 2"):
        server.generate_group(reqs, [stop_at_third, lambda: True])
    with pytest.raises(Cancelled, match="before it started"):
        server.generate_group(reqs, [lambda: True, lambda: True])
    # one request that would stop does not stop the work its batch-mate still wants
    short = [_req(server, stages="128x128:2"), _req(server, stages="128x128:2", seed=1)]
    assert len(server.generate_group(short, [lambda: True, lambda: False])) == 2


def test_static_fp8_scales_on_the_torch_modules():
    """--precision fp8 --fp8-scales static without engines: the replica quantizes its UNet and calibrates the
    scales over the served sizes' default plans (the CPU runs the FP8 layers; a GPU's check is preflight's), as
    the runtime's calibration of those plans gives them."""
    from megafusion.core.loading import load_model
    from megafusion.core.plan import default_plan
    from megafusion.engine.fp8 import Fp8Linear, Fp8Policy, quantize_unet
    from megafusion.runtime.fp8_calibration import calibrate_for_plan

    server = ModelServer(ServeConfig("tiny-sd15", precision="fp8", fp8_scales="static", sizes=((128, 128), (192, 128))))
    layers = [m for m in server.bundle.unet.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.input_scale is not None for m in layers)
    assert not server.fp8_static.loaded and len(server.fp8_static.scales) == len(layers)
    assert server.describe()["fp8_scales"] == "static" and server.describe()["precision"] == "fp8"
    ref = load_model("tiny-sd15", dtype=torch.bfloat16)  # as the replica loads it for FP8
    quantize_unet(ref.unet, Fp8Policy(activations="static"))
    want = calibrate_for_plan(ref, [default_plan(server.family, w, h) for w, h in server.cfg.served_sizes], 2, True,
                              "cpu")
    assert server.fp8_static.scales == pytest.approx(want, rel=1e-6)
    got = server.generate(parse_request({"prompt": "a cube", "stages": "128x128:2", "seed": 5}, server.family))
    assert got.png[:8] == b"\x89PNG\r\n\x1a\n"
