"""mf-serve for SD3 and FLUX (serve/flow_model.py, flow_conditioned.py, flow_config.py), without Ray: requests read
by the flow runtime's rules, the served PNG bytes equal to mf-generate's for the same flags (tiny-sd3 / tiny-flux,
float32 on the CPU, this process's threads for both), conditions served, and bad flags and fields refused in one
line naming them."""
from __future__ import annotations

import pytest

from megafusion.core.families import get_family
from megafusion.serve.conditions import Offered
from megafusion.serve.config import ConfigError, ServeConfig, check_config
from megafusion.serve.request import RequestError, parse_request

from .test_conditions import b64, png_bytes

STAGES = "128x128:2,160x160:1"
MODELS = ("tiny-sd3", "tiny-flux")


def test_request_read_by_the_flow_rules():
    from megafusion.runtime.flow_pipeline import FlowGenerationOptions

    sd3, flux = get_family("tiny-sd3"), get_family("tiny-flux")
    req = parse_request({"prompt": "x", "negative_prompt": "blur", "stages": STAGES}, sd3)
    assert isinstance(req.options, FlowGenerationOptions)
    assert (req.options.guidance, req.options.negative_prompt) == (7.0, "blur")
    assert parse_request({"prompt": "x"}, flux).options.guidance == 3.5  # FLUX's guidance embedding default
    # diffusers' flow rule: strength 0.2 of 3 steps skips int(3 - 0.6) = 2 and runs one (the UNet rule runs none)
    img = parse_request({"prompt": "x", "stages": STAGES, "image": b64(png_bytes(1)), "strength": 0.2}, flux)
    assert img.conditions.image.strength == 0.2
    with pytest.raises(RequestError, match="strength 0.2: runs int"):
        parse_request({"prompt": "x", "stages": "128x128:2,192x192:1", "image": b64(png_bytes(1)),
                       "strength": 0.2}, get_family("tiny-sd15"))
    a, b = (parse_request({"prompt": p, "stages": STAGES}, sd3) for p in "ab")
    assert a.batch_key() != b.batch_key()  # the flow runtime has no batched loop: each runs alone


@pytest.mark.parametrize("model,body,field,needle", [
    ("tiny-sd3", {"dilation": 2}, "dilation", "dilation 2: tiny-sd3 is a transformer"),
    ("tiny-flux", {"negative_prompt": "blur"}, "negative_prompt", "tiny-flux is guidance-distilled"),
    ("tiny-flux", {"guidance": -1}, "guidance", "guidance -1: expected a finite number >= 0"),
    ("tiny-sd3", {"stages": "128x128:2,136x136:1"}, "stages", "not a positive multiple of 16"),
    ("tiny-sd3", {"image": "x", "start_stage": 3, "stages": STAGES}, "start_stage",
     "start_stage 3: the plan has stages 1 to 2"),
    ("tiny-flux", {"image": "x", "strength": 0.9, "start_stage": 2, "stages": STAGES}, "strength",
     "not start_stage 2"),
    ("tiny-flux", {"control_images": ["x"]}, "control_images", "this server has no ControlNet"),
    ("tiny-sd3", {"ip_adapter_image": "x"}, "ip_adapter_image", "this server has no IP-Adapter"),
])
def test_bad_field_refused_naming_it(model, body, field, needle):
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "x", **body}, get_family(model), offered=Offered())
    assert e.value.field == field and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    """Folders and files that a tiny-sd3 / tiny-flux server must refuse, made without any model."""
    import json

    from safetensors.torch import save_file
    import torch

    d = tmp_path_factory.mktemp("flow-flags")
    for name, cls in (("unetcn", "ControlNetModel"), ("sd3cn", "SD3ControlNetModel")):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps({"_class_name": cls}))
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 4)},
              str(d / "unet_lora.safetensors"))
    (d / "empty").mkdir()
    return d


@pytest.mark.parametrize("model,kw,needle", [
    ("tiny-flux", {"precision": "fp8"}, "--precision fp8: mf-serve does not run it for tiny-flux yet"),
    ("tiny-sd3", {"controlnets": ("{d}/unetcn",)}, "a ControlNetModel folder; tiny-sd3 takes a SD3ControlNetModel"),
    ("tiny-flux", {"controlnets": ("{d}/sd3cn",)},
     "a SD3ControlNetModel folder; tiny-flux takes a FluxControlNetModel"),
    ("tiny-sd3", {"controlnets": ("{d}/sd3cn",), "engines": "{d}/empty", "loras": ("{d}/unet_lora.safetensors",)},
     "--lora with --engines and --controlnet"),
    ("tiny-sd3", {"loras": ("{d}/unet_lora.safetensors",)}, "unknown key 'unet.down_blocks.0"),
])
def test_bad_flags_refused_in_one_line(model, kw, needle, flags):
    kw = {k: tuple(x.format(d=flags) for x in v) if isinstance(v, tuple) else v.format(d=flags) for k, v in kw.items()}
    with pytest.raises(ConfigError) as e:
        check_config(ServeConfig(model, **kw))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_engines_that_do_not_serve_are_refused_before_ray(flags, capsys, monkeypatch):
    """--engines for a DiT family: mf-serve exits 2 with one line naming the folder and the build command, before
    Ray and before any model load."""
    import sys

    from megafusion.cli.serve import main

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the bad flag was refused")

    monkeypatch.setattr("megafusion.core.loading.load_model", no_load)
    assert main(["--model", "tiny-sd3", "--engines", str(flags / "empty"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mf-serve: error: --engines {str(flags / 'empty')!r}: "), err
    assert "holds no tiny-sd3 transformer engines" in err[0] and "mf-build-engines --model tiny-sd3" in err[0]
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def mf_generate(tmp_path, model: str, args: list[str]) -> bytes:
    from megafusion.cli.generate import main

    out = tmp_path / "ref.png"
    out.unlink(missing_ok=True)
    assert main(["--model", model, "--device", "cpu", "--no-progress", "--prompt", "a fox", "--stages", STAGES,
                 "--relay", "latent", "--seed", "3", "--output", str(out), *args]) == 0
    return out.read_bytes()


def served(server, files=None, **fields) -> bytes:
    body = {"prompt": "a fox", "stages": STAGES, "relay": "latent", "seed": 3}
    for name, value in fields.items():
        body[name] = ([b64((files / v).read_bytes()) for v in value] if name == "control_images" else
                      b64((files / value).read_bytes()) if name.endswith("image") else value)
    return server.generate(parse_request(body, server.family, server.cfg.served_sizes, server.offered)).png


@pytest.mark.parametrize("model", MODELS)
def test_plain_requests_are_mf_generates_bytes(model, tmp_path):
    from megafusion.serve.flow_model import FlowModelServer, open_model_server

    server = open_model_server(check_config(ServeConfig(model, sizes=((160, 160),))))
    assert isinstance(server, FlowModelServer) and server.mode == "eager"
    assert [s for s, _ in server.warm_up()] == ["160x160"]
    extra = {"negative_prompt": "blur", "guidance": 5.5} if model == "tiny-sd3" else {"guidance": 2.5}
    flags = ["--negative-prompt", "blur", "--guidance", "5.5"] if model == "tiny-sd3" else ["--guidance", "2.5"]
    assert served(server, **extra) == mf_generate(tmp_path, model, flags)
    assert served(server) == mf_generate(tmp_path, model, [])  # the family's default guidance on both sides
    assert server.batch_limit(parse_request({"prompt": "x"}, server.family)) == 1
    asked = []

    def stop_at_third():
        asked.append(1)
        return len(asked) >= 3  # once before the request, then after each step

    from megafusion.serve.model import Cancelled

    with pytest.raises(Cancelled, match="stage 1, step 2"):
        server.generate(parse_request({"prompt": "x", "stages": "128x128:50"}, server.family), stop_at_third)


@pytest.fixture(scope="module")
def condition_files(tmp_path_factory):
    """Per family: a ControlNet, an IP-Adapter and its image encoder, a LoRA; and the request's images."""
    from megafusion.core.families import FAMILIES
    from megafusion.core.loading import load_model
    from tests.core.test_dit_lora import _random_lora, save_diffusers
    from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet
    from tests.runtime.test_flow_ipadapter import save_tiny_flux_ip_adapter
    from tests.runtime.test_flow_ipadapter_sd3 import save_tiny_sd3_ip_adapter, save_tiny_siglip
    from tests.runtime.test_ipadapter import save_tiny_image_encoder

    d = tmp_path_factory.mktemp("flow-conditions")
    for name, seed in (("photo.png", 1), ("edges.png", 2), ("ref.png", 3)):
        (d / name).write_bytes(png_bytes(seed, (128, 128)))
    out = {"dir": d}
    for model in MODELS:
        fam = FAMILIES[model]
        save_ip = save_tiny_sd3_ip_adapter if model == "tiny-sd3" else save_tiny_flux_ip_adapter
        enc = (save_tiny_siglip if model == "tiny-sd3" else save_tiny_image_encoder)(d / f"{model}-enc")
        out[model] = {"cn": str(save_tiny_flow_controlnet(fam, d / f"{model}-cn", seed=1)),
                      "ip": str(save_ip(fam.transformer, d / f"{model}-ip.safetensors")), "enc": str(enc),
                      "lora": str(save_diffusers(_random_lora(load_model(model)), d / f"{model}-lora.safetensors"))}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_served_conditions_are_mf_generates_bytes(model, condition_files, tmp_path):
    """One server with a LoRA, a ControlNet and an IP-Adapter: each request's conditions give mf-generate's bytes
    with the same flags; a request without them is mf-generate's image with the LoRA alone (the IP-Adapter at scale
    0 adds an exact zero)."""
    from megafusion.serve.flow_model import FlowModelServer

    f, d = condition_files[model], condition_files["dir"]
    server = FlowModelServer(check_config(ServeConfig(model, sizes=((160, 160),), loras=(f"{f['lora']}:0.7",),
                                                      controlnets=(f["cn"],), ip_adapter=f["ip"],
                                                      ip_adapter_encoder=f["enc"])))
    lora = ["--lora", f"{f['lora']}:0.7"]
    cn = ["--controlnet", f["cn"], "--control-image", str(d / "edges.png")]
    ip = ["--ip-adapter", f["ip"], "--ip-adapter-encoder", f["enc"], "--ip-adapter-image", str(d / "ref.png")]
    plain = served(server)
    assert plain == mf_generate(tmp_path, model, lora)
    img = served(server, d, image="photo.png", strength=0.6)
    assert img == mf_generate(tmp_path, model, [*lora, "--image", str(d / "photo.png"), "--strength", "0.6"]) != plain
    ctl = served(server, d, control_images=["edges.png"], control_scale=0.8, control_end=0.7)
    assert ctl == mf_generate(tmp_path, model, [*lora, *cn, "--control-scale", "0.8", "--control-end", "0.7"]) != plain
    both = served(server, d, image="photo.png", start_stage=2, control_images=["edges.png"],
                  ip_adapter_image="ref.png", ip_adapter_scale=0.7)
    assert both == mf_generate(tmp_path, model, [*lora, "--image", str(d / "photo.png"), "--start-stage", "2", *cn,
                                                 *ip, "--ip-adapter-scale", "0.7"])
    assert served(server) == plain  # nothing of the last request stays behind
    info = server.describe()
    assert info["controlnets"] == 1 and info["ip_adapter"] and info["loras"] == [f"{f['lora']} x0.7"]


@pytest.mark.slow
def test_served_from_onnxruntime_engines_is_mf_generates_bytes(tmp_path, capsys):
    """--engines with a tiny-sd3 ONNX Runtime transformer engine: chosen before the load for the served size, and
    each request's PNG is mf-generate --engines' (same engine, same bytes); a LoRA on engines that take none is
    refused in one line."""
    from megafusion.cli.build_engines import main as build
    from megafusion.serve.flow_model import FlowModelServer

    from megafusion.serve.preflight import preflight

    stages = "128x128:2,160x192:1"
    assert build(["--model", "tiny-sd3", "--backend", "onnxruntime", "--stages", stages, "--device", "cpu",
                  "--output", str(tmp_path / "narrow")]) == 0
    with pytest.raises(ConfigError) as e:  # the served size's default plan starts at 112x144, outside the engine
        preflight(check_config(ServeConfig("tiny-sd3", engines=str(tmp_path / "narrow"), sizes=((160, 192),))))
    assert "serves 128x128 to 192x192 at batch 1 to 2, not this plan's stages 112x144, 160x192" in str(e.value)
    assert "mf-build-engines --model tiny-sd3 --backend onnxruntime" in str(e.value) and "\n" not in str(e.value)
    assert build(["--model", "tiny-sd3", "--backend", "onnxruntime", "--stages", "112x144:2,160x192:1", "--device",
                  "cpu", "--output", str(tmp_path / "e")]) == 0
    server = FlowModelServer(check_config(ServeConfig("tiny-sd3", engines=str(tmp_path / "e"), sizes=((160, 192),))))
    assert server.describe()["engines"] == f"onnxruntime engine in {tmp_path / 'e'}"
    server.warm_up()
    got = server.generate(parse_request({"prompt": "a fox", "stages": stages, "seed": 3}, server.family,
                                        server.cfg.served_sizes)).png
    from megafusion.cli.generate import main

    capsys.readouterr()
    assert main(["--model", "tiny-sd3", "--device", "cpu", "--no-progress", "--prompt", "a fox", "--stages", stages,
                 "--seed", "3", "--engines", str(tmp_path / "e"), "--output", str(tmp_path / "ref.png")]) == 0
    assert "transformer from the onnxruntime engine" in capsys.readouterr().out
    assert got == (tmp_path / "ref.png").read_bytes()
    lora = tmp_path / "l.safetensors"
    from tests.core.test_dit_lora import _random_lora, save_diffusers

    save_diffusers(_random_lora(server.bundle), lora)
    with pytest.raises(ConfigError, match="--lora with --engines: onnxruntime transformer engines take no LoRA"):
        preflight(check_config(ServeConfig("tiny-sd3", engines=str(tmp_path / "e"), sizes=((160, 192),),
                                           loras=(str(lora),))))


@pytest.mark.slow
def test_served_from_aoti_packages_is_mf_generates_image(flux_aoti, tmp_path, capsys):
    """--engines with the session's tiny-flux aoti packages (tests/conftest.py `flux_aoti`, read only): the served
    image is mf-generate --engines' (same packages; bytes equal); a request whose stage shape has no package is
    refused naming it (a 400 through the app)."""
    from megafusion.cli.generate import main
    from megafusion.serve.flow_model import FlowModelServer
    from megafusion.serve.model import ServeModelError
    from tests.conftest import FLUX_AOTI_STAGES as stages

    engines = str(flux_aoti[0])
    server = FlowModelServer(check_config(ServeConfig("tiny-flux", engines=engines, sizes=((160, 160),))))
    assert server.describe()["engines"] == f"aoti packages in {engines}"
    server.warm_up()
    got = server.generate(parse_request({"prompt": "a fox", "stages": stages, "seed": 3}, server.family,
                                        server.cfg.served_sizes)).png
    assert main(["--model", "tiny-flux", "--device", "cpu", "--no-progress", "--prompt", "a fox", "--stages", stages,
                 "--seed", "3", "--engines", engines, "--output", str(tmp_path / "ref.png")]) == 0
    assert "aoti packages" in capsys.readouterr().out
    assert got == (tmp_path / "ref.png").read_bytes()
    with pytest.raises(ServeModelError, match="no tiny-flux transformer package for the 144x144 stage"):
        server.generate(parse_request({"prompt": "a fox", "stages": "144x144:1,160x160:1"}, server.family,
                                      server.cfg.served_sizes))


@pytest.mark.slow
def test_controlnet_served_from_aoti_packages_is_mf_generates_image(flux_aoti, tmp_path, capsys):
    """--engines --controlnet: plain requests from the session's tiny-flux transformer packages, controlled ones from
    the ControlNet and controlled-transformer packages built here into a copy of that folder (one stage shape); each
    is mf-generate --engines' image (bytes equal); a folder without them, or with another ControlNet's, is refused
    before Ray in one line."""
    import shutil

    from megafusion.cli.build_engines import main as build
    from megafusion.cli.generate import main
    from megafusion.core.families import FAMILIES
    from megafusion.serve.flow_model import FlowModelServer
    from megafusion.serve.preflight import preflight
    from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet

    cn = str(save_tiny_flow_controlnet(FAMILIES["tiny-flux"], tmp_path / "cn", seed=1))
    cfg = ServeConfig("tiny-flux", engines=str(flux_aoti[0]), sizes=((128, 128),), controlnets=(cn,))
    with pytest.raises(ConfigError) as e:
        preflight(check_config(cfg))
    assert "with --controlnet: " in str(e.value) and "--controlnet " + cn in str(e.value), str(e.value)
    eng = tmp_path / "eng"
    shutil.copytree(flux_aoti[0], eng)
    assert build(["--model", "tiny-flux", "--backend", "aoti", "--stages", "128x128:2,128x128:2", "--device", "cpu",
                  "--networks", "transformer", "--controlnet", cn, "--output", str(eng)]) == 0
    other = str(save_tiny_flow_controlnet(FAMILIES["tiny-flux"], tmp_path / "other", seed=2))
    with pytest.raises(ConfigError) as e:  # same architecture, other weights: no package of its folder's key
        preflight(check_config(ServeConfig("tiny-flux", engines=str(eng), sizes=((128, 128),), controlnets=(other,))))
    assert f"no tiny-flux ControlNet package of --controlnet {other} for the 128x128 stage" in str(e.value)
    cfg = preflight(check_config(ServeConfig("tiny-flux", engines=str(eng), sizes=((128, 128),), controlnets=(cn,))))
    server = FlowModelServer(cfg)
    server.warm_up()  # opens and verifies the ControlNet packages too
    (tmp_path / "c.png").write_bytes(png_bytes(2, (128, 128)))
    stages = "128x128:2,128x128:2"
    common = ["--model", "tiny-flux", "--device", "cpu", "--no-progress", "--prompt", "a fox", "--stages", stages,
              "--seed", "3", "--engines", str(eng)]
    body = {"prompt": "a fox", "stages": stages, "seed": 3}
    for fields, flags in (({}, []), ({"control_images": [b64(png_bytes(2, (128, 128)))], "control_scale": 0.8},
                                     ["--controlnet", cn, "--control-image", str(tmp_path / "c.png"),
                                      "--control-scale", "0.8"])):
        got = server.generate(parse_request({**body, **fields}, server.family, cfg.served_sizes, server.offered)).png
        out = tmp_path / "ref.png"
        out.unlink(missing_ok=True)
        assert main([*common, *flags, "--output", str(out)]) == 0
        assert got == out.read_bytes(), fields.keys()
    assert "controlnet: 1 from the aoti packages" in capsys.readouterr().out


def test_a_replica_refuses_a_size_its_memory_cannot_hold_before_the_load(monkeypatch):
    # FLUX.1's layout in float32 on the CPU estimates about 75 GiB at 2048 (63 of it weights): a replica on a machine
    # with 32 GiB says so in one line, naming the size, before loading anything
    from megafusion.serve.flow_model import FlowModelServer

    def no_load(*a, **kw):
        raise AssertionError("the replica loaded the model before refusing the size")

    monkeypatch.setattr("megafusion.serve.flow_model.load_model", no_load)
    monkeypatch.setattr("megafusion.core.memory.device_memory", lambda device: (32 * 2**30, "this machine's memory"))
    cfg = check_config(ServeConfig("flux", random_weights=True, sizes=((1024, 1024), (2048, 2048))))
    with pytest.raises(ConfigError) as e:
        FlowModelServer(cfg)
    said = str(e.value)
    assert said.startswith("--sizes 1024x1024: flux's plan") and "more than this machine's memory (32.0 GiB)" in said
    assert "\n" not in said
