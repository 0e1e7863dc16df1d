"""TensorRT optimization profiles, computed and checked without TensorRT; integration skips without it.

TensorRT is not installed on the CPU machines this suite runs on: the build and runner are written to
TensorRT 10's documented API and are NOT verified by these tests.
"""
from __future__ import annotations

import dataclasses

import pytest

from megafusion.engine.tensorrt_backend import ProfileError, optimization_profiles, select_profile
from megafusion.core.families import get_family
from megafusion.core.plan import Stage, validate_plan
from megafusion.core.specs import ShapeProfile, plan_requirements

SDXL = get_family("sdxl")


def reqs(family, stages, **kw):
    return {r.spec.name: r for r in plan_requirements(family, validate_plan(family, stages), **kw)}


def test_sdxl_default_plan_one_profile_per_stage():
    r = reqs(SDXL, [Stage(1024, 1024, 40), Stage(1536, 1536, 5), Stage(2048, 2048, 5)], precision="fp16")
    dil = optimization_profiles(r["unet-dilated-fp16"].spec, r["unet-dilated-fp16"].profiles)
    assert len(dil) == 2
    assert dil[0][0] == ("sample", (1, 4, 192, 192), (2, 4, 192, 192), (2, 4, 192, 192))
    assert dil[1][0] == ("sample", (1, 4, 256, 256), (2, 4, 256, 256), (2, 4, 256, 256))
    assert [row[0] for row in dil[1]] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert dil[1][1] == ("timestep", (1,), (1,), (1,))
    assert dil[1][2] == ("encoder_hidden_states", (1, 77, 2048), (2, 77, 2048), (2, 77, 2048))
    std = optimization_profiles(r["unet-standard-fp16"].spec, r["unet-standard-fp16"].profiles)
    assert [p[0][2] for p in std] == [(2, 4, 128, 128)]
    dec = optimization_profiles(r["vae_decoder-fp32"].spec, r["vae_decoder-fp32"].profiles)
    assert [p[0][3] for p in dec] == [(1, 4, 128, 128), (1, 4, 192, 192), (1, 4, 256, 256)]
    enc = optimization_profiles(r["vae_encoder-fp32"].spec, r["vae_encoder-fp32"].profiles)
    assert [p[0][1] for p in enc] == [(1, 3, 1536, 1536), (1, 3, 2048, 2048)]


def test_non_square_plan():
    fam = get_family("sd15")
    r = reqs(fam, [Stage(384, 640, 40), Stage(1088, 1920, 10)])
    (p,) = optimization_profiles(r["unet-dilated-fp32"].spec, r["unet-dilated-fp32"].profiles)
    assert p[0][2] == (2, 4, 136, 240)


def test_select_profile():
    r = reqs(SDXL, [Stage(1024, 1024, 40), Stage(1536, 1536, 5), Stage(2048, 2048, 5)])["vae_decoder-fp32"]
    rows = optimization_profiles(r.spec, r.profiles)
    assert select_profile(rows, {"latent": (1, 4, 192, 192)}) == 1
    assert select_profile(rows, {"latent": (1, 4, 256, 256)}) == 2
    with pytest.raises(ProfileError, match="no optimization profile"):
        select_profile(rows, {"latent": (1, 4, 200, 200)})
    with pytest.raises(ProfileError):
        select_profile(rows, {"latent": (2, 4, 128, 128)})  # batch 2 exceeds the VAE's max


def _bad(profile: ShapeProfile, name, lo=None, hi=None, opt=None):
    shapes = tuple((n, lo or a, opt or o, hi or b) if n == name else (n, a, o, b) for n, a, o, b in profile.shapes)
    return dataclasses.replace(profile, shapes=shapes)


def test_profiles_that_do_not_fit_the_spec_are_refused():
    r = reqs(get_family("tiny-sdxl"), [Stage(128, 128, 1)])["unet-standard-fp32"]
    (p,) = r.profiles
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        optimization_profiles(r.spec, (_bad(p, "sample", hi=(1, 4, 16, 16)),))  # max batch 1 < opt 2
    with pytest.raises(ProfileError, match="fixed at 4"):
        optimization_profiles(r.spec, (_bad(p, "sample", (1, 3, 16, 16), (2, 3, 16, 16), (2, 3, 16, 16)),))
    missing = dataclasses.replace(p, shapes=p.shapes[:-1])
    with pytest.raises(ProfileError, match="lacks input time_ids"):
        optimization_profiles(r.spec, (missing,))
    with pytest.raises(ProfileError, match="no shape profiles"):
        optimization_profiles(r.spec, ())


def test_tensorrt_build_and_run(tiny_sdxl, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt is not installed (CPU machine); TensorRT is unverified here")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from megafusion.engine.tensorrt_backend import TrtRunner, build_engine
    from megafusion.export.onnx_export import export_onnx

    r = reqs(tiny_sdxl.family, [Stage(128, 128, 1), Stage(256, 256, 1)])["vae_decoder-fp32"]
    onnx_path = export_onnx(tiny_sdxl, r.spec, tmp_path / "dec.onnx").files[0]
    (tmp_path / "dec.plan").write_bytes(build_engine(onnx_path, r.spec, r.profiles, False, tmp_path / "t.cache"))
    runner = TrtRunner(tmp_path / "dec.plan", r.spec, r.profiles, "cuda")
    for lat in (16, 32):
        x = torch.randn(1, 4, lat, lat, device="cuda")
        ref = tiny_sdxl.vae.to("cuda").decode(x).sample
        torch.testing.assert_close(runner.run({"latent": x})["image"], ref, atol=1e-3, rtol=1e-3)
