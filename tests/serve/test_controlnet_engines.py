"""`mf-serve --engines --controlnet`: a request's control images run on the ControlNet engines and the controlled-UNet
engine (engine/controlnet_engines.py) opened for its plan, and the PNG is mf-generate --engines --controlnet's."""
from __future__ import annotations

import pytest

from megafusion.serve.config import ServeConfig

from .test_conditions import b64, png_bytes

pytestmark = pytest.mark.slow


def test_control_images_on_controlnet_engines_are_mf_generates_bytes(sd15_control_ort, tmp_path, capsys):
    from tests.engines import STAGES

    from megafusion.cli.generate import main
    from megafusion.serve.model import ModelServer
    from megafusion.serve.request import parse_request

    out, cn, _ = sd15_control_ort  # plain engines + `mf-build-engines --controlnet`'s (tests/conftest.py); read only
    base = ["--model", "tiny-sd15", "--stages", STAGES, "--device", "cpu"]
    (tmp_path / "edges.png").write_bytes(png_bytes(2))
    server = ModelServer(ServeConfig("tiny-sd15", engines=str(out), sizes=((256, 256),), controlnets=(str(cn),)))
    body = {"prompt": "a kite", "stages": STAGES, "seed": 2, "control_images": [b64(png_bytes(2))],
            "control_scale": 0.9}
    got = server.generate(parse_request(body, server.family, offered=server.offered)).png
    ref = tmp_path / "ref.png"
    capsys.readouterr()
    assert main([*base, "--engines", str(out), "--prompt", "a kite", "--seed", "2", "--no-progress",
                 "--controlnet", str(cn), "--control-image", str(tmp_path / "edges.png"), "--control-scale", "0.9",
                 "--output", str(ref)]) == 0
    assert "controlnet:" in capsys.readouterr().out
    assert got == ref.read_bytes()
    assert server.generate(parse_request({k: v for k, v in body.items() if not k.startswith("control")},
                                         server.family)).png != got  # a plain request runs on the plain engines
