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


def test_startup_checks_the_controlnet_engines_and_warms_them(sd15_engines, sd15_control_ort, tiny_sd15, tmp_path,
                                                               capsys):
    """Before Ray starts, a folder without controlnet / unet_controlled entries for every --sizes entry's default
    plan (128x128: one stage, which the session's engines cover) is refused in one line with the build command, as
    is a folder whose entries hold another ControlNet's weights; a folder with them passes, and the warm-up opens
    the controlled engines beside the plain ones."""
    from tests.runtime.test_controlnet import save_tiny_controlnet

    from megafusion.serve.config import check_config
    from megafusion.serve.model import ModelServer, ServeModelError
    from megafusion.serve.preflight import preflight

    from .test_preflight import _refused

    out, cn, _ = sd15_control_ort
    build = ("build them with: mf-build-engines --model tiny-sd15 --stages 128x128:50 --backend onnxruntime "
             "--precision fp32 --device cpu --ort-optimize none --output")
    _refused(["--sizes", "128x128", "--engines", str(sd15_engines), "--controlnet", str(cn)],
             f"--sizes 128x128: the engines in {sd15_engines} have no controlnet (standard, fp32) of --controlnet "
             f"{cn} at 128x128; {build} {sd15_engines} --controlnet {cn}", capsys)
    cfg = preflight(check_config(ServeConfig("tiny-sd15", engines=str(out), sizes=((128, 128),),
                                             controlnets=(str(cn),))))
    server = ModelServer(cfg)
    assert not any("controlnet" in key for key in server._engines)
    assert [size for size, _ in server.warm_up()] == ["128x128"]
    assert sum("controlnet" in key for key in server._engines) == 1  # the 128x128 plan's controlled engines
    # another ControlNet of the same architecture: its folder's fingerprint (its files, no module loaded) keys no
    # entry, refused before Ray as the warm-up would refuse it
    other = save_tiny_controlnet(tiny_sd15.unet, tmp_path / "other", 9)
    _refused(["--sizes", "128x128", "--engines", str(out), "--controlnet", str(other)],
             f"--sizes 128x128: the engines in {out} have no controlnet (standard, fp32) of --controlnet {other} at "
             f"128x128; {build} {out} --controlnet {other}", capsys)
    cfg = check_config(ServeConfig("tiny-sd15", engines=str(out), sizes=((128, 128),), controlnets=(str(other),)))
    with pytest.raises(ServeModelError, match=f"no controlnet \\(standard, fp32\\) of --controlnet {other} at"):
        ModelServer(cfg).warm_up()
