"""`mf-build-engines --ip-adapter` and `mf-generate --engines --ip-adapter` (engine/ipadapter_engines.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from megafusion.cli import build_engines as build_cli
from megafusion.cli import generate as gen_cli
from tests.conftest import IP_SCALE
from tests.engines import STAGES
from tests.runtime.test_ipadapter import save_ip_adapter, save_tiny_image_encoder, tiny_ip_adapter

BASE = ["--model", "tiny-sd15", "--stages", STAGES, "--device", "cpu"]


def _one_line(err: str, needle: str) -> None:
    assert err.count("\n") == 1 and needle in err, err


def _image(path, seed=2):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_build_then_generate_on_engines_matches_torch_path(tiny_sd15, sd15_ip_ort, ip_encoder, tmp_path, capsys):
    built, ip, _ = sd15_ip_ort
    out = tmp_path / "engines"
    shutil.copytree(built, out)
    assert build_cli.main([*BASE, "--ip-adapter", str(ip), "--ip-adapter-scale", str(IP_SCALE), "--networks",
                           "unet_ip-dilated", "--output", str(out)]) == 0
    said = capsys.readouterr().out  # that network alone, and none of the plan's others
    assert "ip-adapter: 0 built, 1 up to date" in said and "manifest" not in said

    enc, ref = ip_encoder, _image(tmp_path / "ref.png")  # the folder holds this encoder's engine
    gen = [*BASE, "--prompt", "a teapot", "--no-progress", "--ip-adapter", str(ip), "--ip-adapter-image", str(ref),
           "--ip-adapter-encoder", str(enc)]
    paths = {k: tmp_path / f"{k}.png" for k in ("engines", "torch", "plain")}
    assert gen_cli.main([*gen, "--ip-adapter-scale", str(IP_SCALE), "--engines", str(out), "--output",
                         str(paths["engines"])]) == 0
    assert "(unet_ip onnxruntime engines; image encoder onnxruntime engine)" in capsys.readouterr().out
    assert gen_cli.main([*gen, "--ip-adapter-scale", str(IP_SCALE), "--output", str(paths["torch"])]) == 0
    assert gen_cli.main([*BASE, "--prompt", "a teapot", "--no-progress", "--engines", str(out), "--output",
                         str(paths["plain"])]) == 0
    a, b, plain = (np.asarray(Image.open(p)).astype(int) for p in paths.values())
    assert np.abs(a - b).max() <= 1  # as tests.engines asks of every engine run
    assert np.abs(a - plain).max() > 10  # the IP-Adapter acts
    capsys.readouterr()

    unbuilt = save_tiny_image_encoder(tmp_path / "unbuilt")  # same weights, but its own folder: not built here
    (unbuilt / "note.txt").write_text("another folder fingerprint")
    enc_at = gen.index("--ip-adapter-encoder") + 1
    assert gen_cli.main([*gen[:enc_at], str(unbuilt), *gen[enc_at + 1:], "--ip-adapter-scale", str(IP_SCALE),
                         "--engines", str(out), "--output", str(paths["plain"])]) == 0
    assert "(unet_ip onnxruntime engines; image encoder in torch)" in capsys.readouterr().out
    assert np.abs(np.asarray(Image.open(paths["plain"])).astype(int) - a).max() <= 1  # the same encoder, in torch

    bad = tmp_path / "bad.png"
    assert gen_cli.main([*gen, "--ip-adapter-scale", "0.5", "--engines", str(out), "--output", str(bad)]) == 2
    _one_line(capsys.readouterr().err, "built with --ip-adapter-scale 0.7, not 0.5: run with --ip-adapter-scale 0.7")
    other = save_ip_adapter(tiny_ip_adapter(tiny_sd15.unet, seed=6), tmp_path / "other.safetensors")
    other_gen = [*gen[:gen.index("--ip-adapter") + 1], str(other), *gen[gen.index("--ip-adapter") + 2:]]
    assert gen_cli.main([*other_gen, "--engines", str(out), "--output", str(bad)]) == 2
    _one_line(capsys.readouterr().err, f"build them with: mf-build-engines --model tiny-sd15 --stages "
                                       f"128x128:2,256x256:2 --backend onnxruntime --precision fp32 --device cpu "
                                       f"--ort-optimize none --output {out} --ip-adapter {other} "
                                       f"--ip-adapter-scale 1.0")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    wide = tmp_path / "wide"  # projects to 16 features, the IP-Adapter takes 24
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=16,
                                                   num_hidden_layers=1, num_attention_heads=4, image_size=32,
                                                   patch_size=8)).save_pretrained(str(wide))
    capsys.readouterr()
    assert gen_cli.main([*gen[:enc_at], str(wide), "--ip-adapter-scale", str(IP_SCALE), "--engines", str(out),
                         "--output", str(bad)]) == 2
    _one_line(capsys.readouterr().err, "projects to 16 features; the IP-Adapter")  # before loading the encoder
    assert not bad.exists()


@pytest.mark.parametrize("extra, needle", [
    (["--backend", "torch"], "IP-Adapter engines are built for aoti and onnxruntime, not --backend torch"),
    (["--backend", "aoti", "--dynamic"], "static per stage shape; leave out --dynamic"),
    (["--jobs", "2"], "build the IP-Adapter engines with --jobs 1"),
    (["--ip-adapter-scale", "nan"], "--ip-adapter-scale nan: must be a finite number"),
])
def test_build_refusals_before_the_load(tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setattr("megafusion.core.loading.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    ip = tmp_path / "ip.safetensors"
    ip.write_bytes(b"")
    args = [*BASE, "--output", str(tmp_path / "o")]
    assert build_cli.main([*args, "--ip-adapter", str(ip), *extra]) == 2
    _one_line(capsys.readouterr().err, needle)
    assert build_cli.main([*args, "--ip-adapter", str(tmp_path / "none.safetensors")]) == 2
    _one_line(capsys.readouterr().err, "none.safetensors': no such file")
    assert build_cli.main([*args, "--networks", "unet,unet_ip-dilated"]) == 2
    _one_line(capsys.readouterr().err, "--networks unet_ip-dilated: IP-Adapter networks need --ip-adapter FILE")
    assert build_cli.main([*args, "--ip-adapter-scale", "0.5"]) == 2
    _one_line(capsys.readouterr().err, "--ip-adapter-scale needs --ip-adapter")


@pytest.mark.parametrize("extra, needle", [
    (["--controlnet", "CN", "--control-image", "IMG"], "--ip-adapter with --engines and --controlnet"),
    (["--lora", "LORA"], "--ip-adapter with --engines and --lora"),
])
def test_generate_refuses_ip_engines_with_other_conditions_before_the_load(tmp_path, capsys, monkeypatch, extra,
                                                                           needle):
    monkeypatch.setattr("megafusion.core.loading.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{}")
    (tmp_path / "l.safetensors").write_bytes(b"")
    (tmp_path / "ip.safetensors").write_bytes(b"")
    img = _image(tmp_path / "img.png")
    subst = {"CN": str(tmp_path / "cn"), "IMG": str(img), "LORA": str(tmp_path / "l.safetensors")}
    out = tmp_path / "x.png"
    assert gen_cli.main([*BASE, "--prompt", "a kite", "--ip-adapter", str(tmp_path / "ip.safetensors"),
                         "--ip-adapter-image", str(img), "--ip-adapter-encoder", str(tmp_path / "enc"),
                         *[subst.get(a, a) for a in extra], "--engines", str(tmp_path), "--output", str(out)]) == 2
    _one_line(capsys.readouterr().err, needle)
    assert not out.exists()


def test_build_refuses_ip_adapter_for_other_families(tmp_path, capsys):
    for model in ("tiny-if", "tiny-flux"):
        assert build_cli.main(["--model", model, "--ip-adapter", str(tmp_path / "x"), "--output",
                               str(tmp_path / "o")]) == 2
        _one_line(capsys.readouterr().err, f"--ip-adapter: {model} has no IP-Adapter engines")


def test_build_refuses_encoder_flags_before_the_load(tmp_path, capsys, monkeypatch):
    """--ip-adapter-encoder: needs --ip-adapter, a CLIP vision folder; --networks image_encoder needs the folder."""
    monkeypatch.setattr("megafusion.core.loading.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    ip = tmp_path / "ip.safetensors"
    ip.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    args = [*BASE, "--output", str(tmp_path / "o")]
    for extra, needle in (
            (["--ip-adapter-encoder", str(tmp_path)], "--ip-adapter-encoder needs --ip-adapter"),
            (["--networks", "image_encoder"], "--networks image_encoder: IP-Adapter networks need --ip-adapter FILE"),
            (["--ip-adapter", str(ip), "--ip-adapter-encoder", str(tmp_path / "empty")],
             f"--ip-adapter-encoder {str(tmp_path / 'empty')!r}: not a CLIP vision model folder (no config.json)"),
            (["--ip-adapter", str(ip), "--networks", "unet_ip,image_encoder"],
             "--networks image_encoder: the image encoder engine needs --ip-adapter-encoder DIR")):
        assert build_cli.main([*args, *extra]) == 2
        _one_line(capsys.readouterr().err, needle)


def test_build_refuses_an_encoder_of_another_width(tiny_sd15, sd15_ip_ort, tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    wide = tmp_path / "wide"  # projects to 16 features, the IP-Adapter takes 24
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=16,
                                                   num_hidden_layers=1, num_attention_heads=4, image_size=32,
                                                   patch_size=8)).save_pretrained(str(wide))
    _, ip, _ = sd15_ip_ort
    capsys.readouterr()  # the save's progress bar
    assert build_cli.main([*BASE, "--ip-adapter", str(ip), "--ip-adapter-encoder", str(wide), "--networks",
                           "image_encoder", "--output", str(tmp_path / "o")]) == 2
    _one_line(capsys.readouterr().err, "projects to 16 features; the IP-Adapter")
    assert not (tmp_path / "o" / "manifest.json").exists()
