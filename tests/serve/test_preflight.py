"""`mf-serve --lora / --precision / --controlnet / --ip-adapter` refusals (serve/config.py, serve/preflight.py):
one line naming the flag and the value, status 2, before Ray starts; a LoRA, ControlNet or IP-Adapter for another
architecture is refused against the model's shapes built on the meta device (no weights loaded)."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def foreign(tiny_sdxl, tmp_path_factory):
    """Files made for tiny-sdxl, which a tiny-sd15 server must refuse, and good ones for tiny-sd15."""
    from tests.core.test_lora import _random_lora, save_diffusers
    from tests.runtime.test_controlnet import save_tiny_controlnet
    from tests.runtime.test_ipadapter import save_ip_adapter, save_tiny_image_encoder, tiny_ip_adapter

    d = tmp_path_factory.mktemp("serve-preflight")
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(8, 4)}, str(d / "unknown.safetensors"))
    return {"lora": save_diffusers(_random_lora(tiny_sdxl), d / "xl-lora.safetensors"),
            "unknown": d / "unknown.safetensors",
            "cn": save_tiny_controlnet(tiny_sdxl.unet, d / "xl-cn"),
            "ip": save_ip_adapter(tiny_ip_adapter(tiny_sdxl.unet), d / "xl-ip.safetensors"),
            "enc": save_tiny_image_encoder(d / "enc"), "dir": d}


def _refused(args, needle, capsys):
    from megafusion.cli.serve import main

    assert main(["--model", "tiny-sd15", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mf-serve: error: ") and needle in err[0], err
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_files_and_combinations_refused(foreign, capsys):
    d, cn, ip, enc = foreign["dir"], str(foreign["cn"]), str(foreign["ip"]), str(foreign["enc"])
    for args, needle in [
        (["--lora", str(d / "none.safetensors")], f"--lora '{d / 'none.safetensors'}': no such file"),
        (["--controlnet", str(d)], f"--controlnet '{d}': not a diffusers ControlNetModel folder"),
        (["--ip-adapter", str(d / "no.safetensors"), "--ip-adapter-encoder", enc], "--ip-adapter '"),
        (["--ip-adapter", ip], "--ip-adapter needs --ip-adapter-encoder DIR"),
        (["--ip-adapter-encoder", enc], "--ip-adapter-encoder needs --ip-adapter"),
        (["--ip-adapter", ip, "--ip-adapter-encoder", str(d)], "not a CLIP vision model folder"),
        (["--engines", str(d), "--controlnet", cn, "--lora", str(foreign["unknown"])],
         "--lora with --engines and --controlnet"),
        (["--ip-adapter", ip, "--ip-adapter-encoder", enc, "--ip-adapter-scale", "0.5"],
         "--ip-adapter-scale 0.5: the scale of --engines' unet_ip engines; on the torch path each request gives"),
        (["--ip-adapter-scale", "0.5"], "--ip-adapter-scale needs --ip-adapter"),
        (["--engines", str(d), "--ip-adapter", ip, "--ip-adapter-encoder", enc, "--ip-adapter-scale", "nan"],
         "--ip-adapter-scale nan: must be a finite number"),
        (["--engines", str(d), "--ip-adapter", ip, "--ip-adapter-encoder", enc, "--controlnet", cn],
         "--ip-adapter with --engines and --controlnet: the IP-Adapter engines hold the base UNet alone"),
        (["--engines", str(d), "--precision", "fp8", "--controlnet", cn],
         "--controlnet with --engines and --precision fp8: FP8 packages are built for the plain UNet"),
        (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    ]:
        _refused(args, needle, capsys)


def test_fp8_on_the_cpu_refused(capsys):
    _refused(["--precision", "fp8"], "--precision fp8 needs a CUDA GPU with FP8 tensor cores", capsys)


def test_another_architecture_refused_before_the_load(foreign, capsys):
    _refused(["--lora", str(foreign["lora"])], "not a LoRA of tiny-sd15's unet, text_encoder", capsys)
    _refused(["--lora", f"{foreign['unknown']}:0.5"],
             "unknown key 'unet.no_such_block.to_q.lora_A.weight'", capsys)
    _refused(["--controlnet", str(foreign["cn"])], "(a ControlNet for another architecture)", capsys)
    _refused(["--ip-adapter", str(foreign["ip"]), "--ip-adapter-encoder", str(foreign["enc"])],
             "--ip-adapter '", capsys)


def test_engines_that_serve_no_size_refused_before_ray(tmp_path, capsys):
    """--engines is held against every --sizes entry's default plan before Ray starts (as SD3 / FLUX's are), by the
    weights' origin: the line names the folder, the size and the command that builds what is missing."""
    empty = tmp_path / "engines"
    empty.mkdir()
    _refused(["--engines", str(empty), "--sizes", "256x256"],
             f"--engines '{empty}', --sizes 256x256: no tiny-sd15 engines in {empty}; build them with: "
             "mf-build-engines --model tiny-sd15 --stages", capsys)
    _refused(["--engines", str(empty), "--precision", "fp8"], f"no tiny-sd15 fp8 engines in {empty}", capsys)


def test_lora_path_made_absolute_keeping_its_scale(tmp_path, monkeypatch):
    from megafusion.cli.serve import _absolute_lora

    monkeypatch.chdir(tmp_path)
    assert _absolute_lora("l.safetensors:0.5") == f"{tmp_path / 'l.safetensors'}:0.5"
    assert _absolute_lora("l.safetensors") == str(tmp_path / "l.safetensors")
