"""mf-generate's extra conditions: --image/--strength/--start-stage (image to image), and their bad values refused
in one line `mf-generate: error: ...`, exit status 2, before the model is loaded, nothing written."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.cli.generate import main

PLAN = ["--model", "tiny-sdxl", "--prompt", "a harbour", "--stages", "128x128:4,256x256:2", "--no-progress",
        "--device", "cpu"]


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(small).resize((128, 128), Image.BILINEAR).save(path)
    return path


def test_upscales_a_photo(photo, tmp_path, capsys):
    out = tmp_path / "up.png"
    assert main([*PLAN, "--image", str(photo), "--start-stage", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "encode image" in text and "stage 2 (256x256, 2 steps)" in text and "stage 1 " not in text
    assert Image.open(out).size == (256, 256)


def test_photo_of_another_shape_warns(photo, tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.open(photo).resize((256, 128)).save(wide)
    assert main([*PLAN, "--image", str(wide), "--strength", "0.2", "--output", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    assert "--image" in err and "is 256x128" in err and "changes its aspect ratio" in err


@pytest.mark.parametrize("args,needle", [
    (["--image", "{missing}"], "no such file"),
    (["--image", "{garbage}"], "not a readable image"),
    (["--image", "{photo}", "--strength", "0"], "--strength 0.0: must be a number in (0, 1]"),
    (["--image", "{photo}", "--strength", "1.01"], "--strength 1.01: must be a number in (0, 1]"),
    (["--image", "{photo}", "--strength", "nan"], "--strength nan: must be a number in (0, 1]"),
    (["--image", "{photo}", "--strength", "0.1"], "runs int(6 * 0.1) = 0 of the plan's 6 steps"),
    (["--image", "{photo}", "--start-stage", "3"], "--start-stage 3: the plan has stages 1 to 2"),
    (["--image", "{photo}", "--start-stage", "2", "--strength", "0.9"],
     "--strength 0.9 starts at step 2 of 6, in stage 1, not --start-stage 2"),
    (["--strength", "0.5"], "--strength and --start-stage need --image"),
])
def test_bad_image_input_one_line(args, needle, photo, tmp_path, capsys, no_model_load):
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG but not really")
    names = {"photo": photo, "missing": tmp_path / "nope.png", "garbage": tmp_path / "garbage.png"}
    out = tmp_path / "out.png"
    rc = main([*PLAN, *(a.format(**names) for a in args), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("mf-generate: error: ") and needle in err, err
    assert not out.exists()


LORA_PLAN = ["--model", "tiny-sd15", "--prompt", "a kite", "--stages", "128x128:2", "--no-progress", "--device", "cpu"]


def test_lora_changes_the_image_and_bad_loras_are_one_line(tiny_sd15, tmp_path, capsys):
    from safetensors.torch import save_file

    from tests.core.test_lora import _random_lora, save_diffusers

    lora = save_diffusers(_random_lora(tiny_sd15), tmp_path / "style.safetensors")
    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    assert main([*LORA_PLAN, "--output", str(plain)]) == 0
    assert main([*LORA_PLAN, "--lora", f"{lora}:0.8", "--output", str(styled)]) == 0
    assert f"lora: {lora} x0.8" in capsys.readouterr().out
    assert (np.asarray(Image.open(plain)) != np.asarray(Image.open(styled))).any()

    save_file({"unet.nowhere.to_q.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "odd.safetensors"))
    out = tmp_path / "x.png"
    # With --engines the LoRA is swapped into the engines (tests/engine/test_lora_swap.py); a bad file is refused
    # before they open (tmp_path holds none: opening would be refused otherwise).
    assert main([*LORA_PLAN, "--lora", str(tmp_path / "odd.safetensors"), "--engines", str(tmp_path),
                 "--output", str(out)]) == 2
    assert "unknown key 'unet.nowhere.to_q.lora_A.weight'" in capsys.readouterr().err
    for arg, needle in [(str(tmp_path / "none.safetensors"), "no such file"),
                        (str(tmp_path / "odd.safetensors"), "unknown key 'unet.nowhere.to_q.lora_A.weight'")]:
        out = tmp_path / "x.png"
        assert main([*LORA_PLAN, "--lora", arg, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mf-generate: error: --lora ") and needle in err, err
        assert not out.exists()


def test_controlnet_runs_and_bad_controls_are_one_line(tiny_sd15, tmp_path, capsys, monkeypatch):
    from tests.runtime.test_controlnet import save_tiny_controlnet

    cn = save_tiny_controlnet(tiny_sd15.unet, tmp_path / "cn")
    edges = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(edges)
    plain, controlled = tmp_path / "plain.png", tmp_path / "controlled.png"
    base = ["--model", "tiny-sd15", "--prompt", "a kite", "--stages", "128x128:2,192x192:1", "--no-progress",
            "--device", "cpu"]
    assert main([*base, "--output", str(plain)]) == 0
    assert main([*base, "--controlnet", str(cn), "--control-image", str(edges), "--control-scale", "0.9",
                 "--control-end", "0.7", "--output", str(controlled)]) == 0
    assert f"controlnet: {cn} x0.9 over 0..0.7" in capsys.readouterr().out
    assert (np.asarray(Image.open(plain)) != np.asarray(Image.open(controlled))).any()

    monkeypatch.setattr("megafusion.core.loading.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    for args, needle in [
        (["--controlnet", str(cn)], "1 --controlnet and 0 --control-image"),
        (["--controlnet", str(tmp_path), "--control-image", str(edges)], "not a diffusers ControlNetModel folder"),
        (["--controlnet", str(cn), "--control-image", str(tmp_path / "no.png")], "no such file"),
        (["--controlnet", str(cn), "--control-image", str(edges), "--control-start", "0.5", "--control-end", "0.5"],
         "need 0 <= start < end <= 1"),
        (["--controlnet", str(cn), "--control-image", str(edges), "--control-scale", "1", "--control-scale", "2",
          "--control-scale", "3"], "--control-scale given 3 times for 1 --controlnet"),
        (["--control-scale", "0.5"], "--control-scale needs --controlnet"),
    ]:
        out = tmp_path / "x.png"
        assert main([*base, *args, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mf-generate: error: ") and needle in err, err
        assert not out.exists()


def test_ip_adapter_runs_and_bad_input_is_one_line(tiny_sd15, tmp_path, capsys, monkeypatch):
    from tests.runtime.test_ipadapter import save_ip_adapter, save_tiny_image_encoder, tiny_ip_adapter

    ip = save_ip_adapter(tiny_ip_adapter(tiny_sd15.unet), tmp_path / "ip.safetensors")
    enc = save_tiny_image_encoder(tmp_path / "enc")
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(ref)
    base = ["--model", "tiny-sd15", "--prompt", "a teapot", "--stages", "128x128:2,192x192:1", "--no-progress",
            "--device", "cpu"]
    plain, adapted = tmp_path / "plain.png", tmp_path / "adapted.png"
    assert main([*base, "--output", str(plain)]) == 0
    assert main([*base, "--ip-adapter", str(ip), "--ip-adapter-image", str(ref), "--ip-adapter-encoder", str(enc),
                 "--ip-adapter-scale", "0.7", "--output", str(adapted)]) == 0
    assert f"ip-adapter: {ip} x0.7" in capsys.readouterr().out
    assert (np.asarray(Image.open(plain)) != np.asarray(Image.open(adapted))).any()

    monkeypatch.setattr("megafusion.core.loading.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    for args, needle in [
        (["--ip-adapter", str(tmp_path / "no.safetensors")], "--ip-adapter"),
        (["--ip-adapter", str(ip)], "--ip-adapter needs --ip-adapter-image FILE and --ip-adapter-encoder DIR"),
        (["--ip-adapter", str(ip), "--ip-adapter-image", str(tmp_path / "no.png"), "--ip-adapter-encoder", str(enc)],
         "--ip-adapter-image"),
        (["--ip-adapter", str(ip), "--ip-adapter-image", str(ref), "--ip-adapter-encoder", str(tmp_path)],
         "not a CLIP vision model folder"),
        (["--ip-adapter-image", str(ref)], "need --ip-adapter"),
    ]:
        out = tmp_path / "x.png"
        assert main([*base, *args, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mf-generate: error: ") and needle in err, err
        assert not out.exists()
