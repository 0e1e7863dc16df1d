"""`mf-serve --engines --ip-adapter`: a request's `ip_adapter_image` runs on the unet_ip engines
(engine/ipadapter_engines.py) opened for its plan beside the plain ones, and the PNG is mf-generate --engines
--ip-adapter's bytes (as the ControlNet engines' serve test asks); startup refuses a folder without this file's
unet_ip entries at this scale for every served size, in one line with the build command."""
from __future__ import annotations

import pytest
import torch

from megafusion.serve.config import ServeConfig

from .test_conditions import b64, png_bytes
from .test_preflight import _refused

pytestmark = pytest.mark.slow

SIZE = (128, 128)
"""Served size whose default plan (one stage, 128x128) the session's IP-Adapter engines (tests/engines.py STAGES)
cover; the requests ask for STAGES, which they cover too."""


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from tests.runtime.test_ipadapter import save_tiny_image_encoder

    return save_tiny_image_encoder(tmp_path_factory.mktemp("serve-ip-enc") / "enc")


def test_ip_requests_on_engines_are_mf_generates_bytes(sd15_ip_ort, encoder, tmp_path, capsys):
    from tests.conftest import IP_SCALE
    from tests.engines import STAGES

    from megafusion.cli.generate import main
    from megafusion.serve.config import check_config
    from megafusion.serve.model import ModelServer
    from megafusion.serve.preflight import preflight
    from megafusion.serve.request import parse_request

    out, ip, _ = sd15_ip_ort  # plain engines + `mf-build-engines --ip-adapter`'s at IP_SCALE; read only
    cfg = ServeConfig("tiny-sd15", engines=str(out), sizes=(SIZE,), ip_adapter=str(ip),
                      ip_adapter_encoder=str(encoder), ip_adapter_scale=IP_SCALE)
    preflight(check_config(cfg))  # the folder serves the size: no refusal
    server = ModelServer(cfg)
    assert [size for size, _ in server.warm_up()] == ["128x128"]  # plain and IP at the size's shapes
    (tmp_path / "ref.png").write_bytes(png_bytes(3))

    def serve(**fields) -> bytes:
        body = {"prompt": "a kite", "stages": STAGES, "seed": 2, **fields}
        return server.generate(parse_request(body, server.family, offered=server.offered)).png

    plain = serve()
    got = serve(ip_adapter_image=b64(png_bytes(3)))  # no scale: the engines' is the default
    ref = tmp_path / "out.png"
    capsys.readouterr()
    assert main(["--model", "tiny-sd15", "--stages", STAGES, "--device", "cpu", "--engines", str(out), "--prompt",
                 "a kite", "--seed", "2", "--no-progress", "--ip-adapter", str(ip), "--ip-adapter-encoder",
                 str(encoder), "--ip-adapter-image", str(tmp_path / "ref.png"), "--ip-adapter-scale", str(IP_SCALE),
                 "--output", str(ref)]) == 0
    # the folder holds this encoder's engine (the same files as sd15_ip_ort's encoder): server and CLI both run it
    assert "(unet_ip onnxruntime engines; image encoder onnxruntime engine)" in capsys.readouterr().out
    assert got == ref.read_bytes()
    assert got != plain  # a plain request runs the plain engines, without the IP-Adapter
    other = serve(ip_adapter_image=b64(png_bytes(7)), ip_adapter_scale=IP_SCALE)
    assert other not in (got, plain)  # each request's embeddings reach the engines
    assert serve(ip_adapter_image=b64(png_bytes(3))) == got and serve() == plain  # nothing stays behind
    # IP and plain are pipelines of their own (their own captured steps on CUDA); a request's embeddings are copied
    # into the buffers made at start, which a captured step reads
    plan = parse_request({"prompt": "x", "stages": STAGES}, server.family).plan
    ip_pipe = server.ip_engines_for(plan, 2, "pixel")
    assert ip_pipe is not server.pipeline_for(plan, 2, "pixel") and ip_pipe.nets.base is server.pipeline_for(
        plan, 2, "pixel").nets
    buffers = {b: (t.data_ptr(), t.clone()) for b, t in ip_pipe.nets.embeds.items()}
    serve(ip_adapter_image=b64(png_bytes(7)))
    for b, (ptr, before) in buffers.items():
        assert ip_pipe.nets.embeds[b].data_ptr() == ptr and not torch.equal(ip_pipe.nets.embeds[b], before)
    assert server.describe()["ip_adapter_scale"] == IP_SCALE


def test_startup_refuses_a_folder_without_these_unet_ip_engines(sd15_engines, sd15_ip_ort, encoder, tiny_sd15,
                                                                tmp_path, capsys):
    from tests.runtime.test_ipadapter import save_ip_adapter, tiny_ip_adapter

    out, ip, _ = sd15_ip_ort
    base = ["--sizes", "128x128", "--ip-adapter-encoder", str(encoder)]  # _refused adds tiny-sd15 on the CPU
    build = ("build them with: mf-build-engines --model tiny-sd15 --stages 128x128:50 --backend onnxruntime "
             "--precision fp32 --device cpu --ort-optimize none --output")
    # plain engines only
    _refused([*base, "--engines", str(sd15_engines), "--ip-adapter", str(ip), "--ip-adapter-scale", "0.7"],
             f"--sizes 128x128: the engines in {sd15_engines} have no unet_ip (standard, fp32) of --ip-adapter {ip} "
             f"at 128x128; {build} {sd15_engines} --ip-adapter {ip} --ip-adapter-scale 0.7", capsys)
    # another scale (1.0 when the flag is left out)
    _refused([*base, "--engines", str(out), "--ip-adapter", str(ip)],
             "built with --ip-adapter-scale 0.7, not 1.0: run with --ip-adapter-scale 0.7, or build", capsys)
    _refused([*base, "--engines", str(out), "--ip-adapter", str(ip), "--ip-adapter-scale", "0.5"],
             "built with --ip-adapter-scale 0.7, not 0.5", capsys)
    # another IP-Adapter file
    other = save_ip_adapter(tiny_ip_adapter(tiny_sd15.unet, seed=8), tmp_path / "other.safetensors")
    _refused([*base, "--engines", str(out), "--ip-adapter", str(other), "--ip-adapter-scale", "0.7"],
             f"have no unet_ip (standard, fp32) of --ip-adapter {other} at 128x128; {build} {out} --ip-adapter "
             f"{other} --ip-adapter-scale 0.7", capsys)
    # a size whose default plan (a 192x192 stage) the folder lacks: the plain engines' refusal, at start too
    _refused(["--sizes", "256x256", *base[2:], "--engines", str(out), "--ip-adapter", str(ip),
              "--ip-adapter-scale", "0.7"], "--sizes 256x256: the engines in", capsys)
    # an encoder of another width
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    wide = tmp_path / "wide"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=16,
                                                   num_hidden_layers=1, num_attention_heads=4, image_size=32,
                                                   patch_size=8)).save_pretrained(str(wide))
    capsys.readouterr()  # the save's progress bar
    _refused([*base[:2], "--ip-adapter-encoder", str(wide), "--engines", str(out), "--ip-adapter", str(ip),
              "--ip-adapter-scale", "0.7"], "projects to 16 features; the IP-Adapter", capsys)


def test_flow_families_have_no_ip_engines(tmp_path):
    from megafusion.serve.config import ConfigError, check_config

    (tmp_path / "ip.safetensors").write_bytes(b"")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--ip-adapter with --engines: tiny-flux has no IP-Adapter engines"):
        check_config(ServeConfig("tiny-flux", engines=str(tmp_path), ip_adapter=str(tmp_path / "ip.safetensors"),
                                 ip_adapter_encoder=str(tmp_path / "enc")))


def test_sdxl_ip_request_on_engines_is_mf_generates_bytes(sdxl_engines, tiny_sdxl, encoder, tmp_path, capsys):
    """SDXL's folder serves every component, where mf-generate used to take a bundle without modules, which the
    IP-Adapter's check cannot read: the same bytes from both here."""
    import shutil

    from tests.engines import STAGES
    from tests.runtime.test_ipadapter import save_ip_adapter, tiny_ip_adapter

    from megafusion.cli import build_engines as build_cli
    from megafusion.cli.generate import main
    from megafusion.serve.model import ModelServer
    from megafusion.serve.request import parse_request

    out = tmp_path / "engines"
    shutil.copytree(sdxl_engines, out)  # the session's folder stays as built
    ip = save_ip_adapter(tiny_ip_adapter(tiny_sdxl.unet, seed=3), tmp_path / "ip.safetensors")
    base = ["--model", "tiny-sdxl", "--stages", STAGES, "--device", "cpu"]
    assert build_cli.main([*base, "--ip-adapter", str(ip), "--ip-adapter-scale", "0.6", "--output", str(out)]) == 0
    server = ModelServer(ServeConfig("tiny-sdxl", engines=str(out), sizes=((256, 256),), ip_adapter=str(ip),
                                     ip_adapter_encoder=str(encoder), ip_adapter_scale=0.6))
    body = {"prompt": "a kite", "stages": STAGES, "seed": 2}
    (tmp_path / "ref.png").write_bytes(png_bytes(3))
    got = server.generate(parse_request({**body, "ip_adapter_image": b64(png_bytes(3))}, server.family,
                                        offered=server.offered)).png
    capsys.readouterr()
    assert main([*base, "--engines", str(out), "--prompt", "a kite", "--seed", "2", "--no-progress", "--ip-adapter",
                 str(ip), "--ip-adapter-encoder", str(encoder), "--ip-adapter-image", str(tmp_path / "ref.png"),
                 "--ip-adapter-scale", "0.6", "--output", str(tmp_path / "out.png")]) == 0
    assert "weights in torch: none" in capsys.readouterr().out
    assert got == (tmp_path / "out.png").read_bytes()
    assert got != server.generate(parse_request(body, server.family)).png
