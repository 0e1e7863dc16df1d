"""A request's extra conditions (serve/conditions.py) and the server's ControlNet, IP-Adapter and LoRA
(serve/conditioned.py, serve/model.py), without Ray: each bad field refused naming it, images decoded as
mf-generate reads its files, and the served PNG bytes equal to mf-generate's with the same flags (tiny-sd15, float32
on the CPU, this process's threads for both)."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from megafusion.core.families import get_family
from megafusion.serve.conditions import Offered, rgb_tensor, decode_image
from megafusion.serve.request import RequestError, parse_request

SD15 = get_family("tiny-sd15")
STAGES = "128x128:2,256x256:2"


def png_bytes(seed: int, size=(96, 80)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_decoded_image_is_what_mf_generate_reads_from_the_file(tmp_path):
    from megafusion.runtime.img2img import read_image

    raw = png_bytes(1)
    (tmp_path / "p.png").write_bytes(raw)
    assert torch.equal(rgb_tensor(decode_image("image", b64(raw))) * 2.0 - 1.0, read_image(tmp_path / "p.png"))
    assert torch.equal(rgb_tensor(decode_image("image", "data:image/png;base64," + b64(raw))),
                       rgb_tensor(decode_image("image", b64(raw))))


def test_fields_read():
    body = {"prompt": "x", "stages": STAGES, "image": b64(png_bytes(2)), "strength": 0.5,
            "control_images": [b64(png_bytes(3)), b64(png_bytes(4))], "control_scale": [0.5, 2],
            "control_end": 0.7, "ip_adapter_image": b64(png_bytes(5)), "ip_adapter_scale": 0.3}
    c = parse_request(body, SD15, offered=Offered(2, True)).conditions
    assert c.image.strength == 0.5 and c.image.start_stage is None and c.image.image.shape == (1, 3, 80, 96)
    assert [(x.scale, x.start, x.end) for x in c.controls] == [(0.5, 0.0, 0.7), (2.0, 0.0, 0.7)]
    assert c.ip_image.size == (96, 80) and c.ip_scale == 0.3 and not c.empty
    assert parse_request({"prompt": "x"}, SD15, offered=Offered(2, True)).conditions.empty
    ip = {"prompt": "x", "ip_adapter_image": b64(png_bytes(5))}  # engines: the built scale is the default
    assert parse_request(ip, SD15, offered=Offered(0, True, 0.7)).conditions.ip_scale == 0.7
    assert parse_request({**ip, "ip_adapter_scale": 0.7}, SD15, offered=Offered(0, True, 0.7)).conditions.ip_scale \
        == 0.7


def test_requests_with_conditions_run_alone():
    plain = [parse_request({"prompt": p}, SD15) for p in ("a", "b")]
    assert plain[0].batch_key() == plain[1].batch_key()
    img = [parse_request({"prompt": p, "image": b64(png_bytes(1))}, SD15) for p in ("a", "b")]
    assert img[0].batch_key() != img[1].batch_key() and img[0].batch_key() != plain[0].batch_key()


GOOD = b64(png_bytes(0))


@pytest.mark.parametrize("extra,offered,field,needle", [
    ({"image": "not base64!"}, Offered(), "image", "image \"not base64!\": not base64"),
    ({"image": b64(b"GIF89a not an image")}, Offered(), "image", "image: not a readable PNG or JPEG image"),
    ({"image": 3}, Offered(), "image", "image 3: expected a base64 PNG or JPEG string"),
    ({"image": GOOD, "strength": 0}, Offered(), "strength", "strength 0: must be a number in (0, 1]"),
    ({"image": GOOD, "strength": 1.5}, Offered(), "strength", "strength 1.5: must be a number in (0, 1]"),
    ({"image": GOOD, "strength": "0.5"}, Offered(), "strength", "strength \"0.5\": must be a number"),
    ({"image": GOOD, "strength": 0.1}, Offered(), "strength", "strength 0.1: runs int(4 * 0.1) = 0"),
    ({"image": GOOD, "start_stage": 3}, Offered(), "start_stage", "start_stage 3: the plan has stages 1 to 2"),
    ({"image": GOOD, "start_stage": 2, "strength": 0.9}, Offered(), "strength", "not start_stage 2"),
    ({"strength": 0.5}, Offered(), "strength", "strength needs image"),
    ({"start_stage": 1}, Offered(), "start_stage", "start_stage needs image"),
    ({"control_images": [GOOD]}, Offered(), "control_images", "this server has no ControlNet"),
    ({"control_images": [GOOD, GOOD]}, Offered(1), "control_images", "2 images for this server's 1 ControlNet"),
    ({"control_images": GOOD}, Offered(1), "control_images", "give a list of one base64 image per ControlNet"),
    ({"control_images": ["%%%"]}, Offered(1), "control_images[0]", "control_images[0] \"%%%\": not base64"),
    ({"control_images": [GOOD], "control_scale": [1, 2]}, Offered(1), "control_scale", "give one number"),
    ({"control_images": [GOOD], "control_scale": "big"}, Offered(1), "control_scale", "expected finite numbers"),
    ({"control_images": [GOOD], "control_start": 0.5, "control_end": 0.5}, Offered(1), "control_start",
     "control_start 0.5 / control_end 0.5: need 0 <= start < end <= 1"),
    ({"control_scale": 0.5}, Offered(1), "control_scale", "control_scale needs control_images"),
    ({"ip_adapter_image": GOOD}, Offered(), "ip_adapter_image", "this server has no IP-Adapter"),
    ({"ip_adapter_scale": 0.5}, Offered(0, True), "ip_adapter_scale", "ip_adapter_scale needs ip_adapter_image"),
    ({"ip_adapter_image": GOOD, "ip_adapter_scale": True}, Offered(0, True), "ip_adapter_scale",
     "ip_adapter_scale true: expected a finite number"),
    ({"ip_adapter_image": GOOD, "ip_adapter_scale": 0.5}, Offered(0, True, 0.7), "ip_adapter_scale",
     "ip_adapter_scale 0.5: this server's IP-Adapter engines were built with scale 0.7; give that or leave"),
])
def test_each_bad_field_refused_naming_it(extra, offered, field, needle):
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "x", "stages": STAGES, **extra}, SD15, offered=offered)
    assert e.value.field == field and needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


# --- the server's conditions against mf-generate, without Ray --------------------------------------------------

@pytest.fixture(scope="module")
def files(tiny_sd15, tmp_path_factory):
    from tests.runtime.test_controlnet import save_tiny_controlnet
    from tests.runtime.test_ipadapter import save_ip_adapter, save_tiny_image_encoder, tiny_ip_adapter

    d = tmp_path_factory.mktemp("serve-conditions")
    for name, seed in (("photo.png", 1), ("edges.png", 2), ("ref.png", 3)):
        (d / name).write_bytes(png_bytes(seed))
    return {"dir": d, "cn": save_tiny_controlnet(tiny_sd15.unet, d / "cn"),
            "ip": save_ip_adapter(tiny_ip_adapter(tiny_sd15.unet, seed=4), d / "ip.safetensors"),
            "enc": save_tiny_image_encoder(d / "enc")}


@pytest.fixture(scope="module")
def served(files):
    from megafusion.serve.config import ServeConfig
    from megafusion.serve.model import ModelServer

    return ModelServer(ServeConfig("tiny-sd15", sizes=((256, 256),), controlnets=(str(files["cn"]),),
                                   ip_adapter=str(files["ip"]), ip_adapter_encoder=str(files["enc"])))


def mf_generate(tmp_path, args: list[str]) -> bytes:
    from megafusion.cli.generate import main

    out = tmp_path / "ref.png"
    assert main(["--model", "tiny-sd15", "--device", "cpu", "--no-progress", "--prompt", "a cube", "--stages",
                 STAGES, "--seed", "3", "--output", str(out), *args]) == 0
    return out.read_bytes()


def serve_png(server, files, **fields) -> bytes:
    body = {"prompt": "a cube", "stages": STAGES, "seed": 3}
    for name, value in fields.items():
        body[name] = ([b64((files["dir"] / v).read_bytes()) for v in value] if name == "control_images" else
                      b64((files["dir"] / value).read_bytes()) if name.endswith("image") else value)
    return server.generate(parse_request(body, server.family, offered=server.offered)).png


@pytest.mark.slow
def test_served_conditions_are_mf_generates_bytes(served, files, tmp_path):
    d = files["dir"]
    cn = ["--controlnet", str(files["cn"]), "--control-image", str(d / "edges.png")]
    ip = ["--ip-adapter", str(files["ip"]), "--ip-adapter-encoder", str(files["enc"]), "--ip-adapter-image",
          str(d / "ref.png")]
    plain = serve_png(served, files)
    assert plain == mf_generate(tmp_path, [])  # the IP-Adapter at scale 0 is skipped: plain requests are plain
    img = serve_png(served, files, image="photo.png", strength=0.6)
    assert img == mf_generate(tmp_path, ["--image", str(d / "photo.png"), "--strength", "0.6"]) != plain
    ctl = serve_png(served, files, control_images=["edges.png"], control_scale=0.8, control_end=0.7)
    assert ctl == mf_generate(tmp_path, [*cn, "--control-scale", "0.8", "--control-end", "0.7"]) != plain
    both = serve_png(served, files, image="photo.png", start_stage=2, control_images=["edges.png"],
                     ip_adapter_image="ref.png", ip_adapter_scale=0.7)
    assert both == mf_generate(tmp_path, ["--image", str(d / "photo.png"), "--start-stage", "2", *cn, *ip,
                                          "--ip-adapter-scale", "0.7"])
    assert serve_png(served, files) == plain  # nothing of the last request stays behind
    assert served.describe()["controlnets"] == 1 and served.describe()["ip_adapter"]
    assert served.batch_limit(parse_request({"prompt": "x"}, served.family)) == 1  # IP-Adapter: one at a time


@pytest.mark.slow
def test_lora_fused_at_start_is_mf_generates_bytes(tiny_sd15, tmp_path):
    from tests.core.test_lora import _random_lora, save_diffusers

    from megafusion.serve.config import ServeConfig
    from megafusion.serve.model import ModelServer

    lora = save_diffusers(_random_lora(tiny_sd15, seed=2), tmp_path / "l.safetensors")
    server = ModelServer(ServeConfig("tiny-sd15", sizes=((256, 256),), loras=(f"{lora}:0.5",)))
    got = server.generate(parse_request({"prompt": "a cube", "stages": STAGES, "seed": 3}, server.family)).png
    assert got == mf_generate(tmp_path, ["--lora", f"{lora}:0.5"])
    assert server.describe()["loras"] == [f"{lora} x0.5"]
