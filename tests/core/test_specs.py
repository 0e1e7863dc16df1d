"""Network specs: I/O names and dtypes, dynamic axes, per-stage shape profiles, sample inputs."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megafusion.core.families import get_family
from megafusion.core.plan import Stage, validate_plan
from megafusion.core.specs import (ShapeProfile, network_spec, plan_requirements, text_encoder_specs, unet_spec,
                                     vae_specs)

TINY_XL, TINY_15, SDXL = get_family("tiny-sdxl"), get_family("tiny-sd15"), get_family("sdxl")


def two_stage(family, a=128, b=256):
    return validate_plan(family, [Stage(a, a, 2), Stage(b, b, 2)])


def by_name(reqs):
    return {r.spec.name: r for r in reqs}


def test_unet_inputs_follow_the_family_layout():
    xl, sd = unet_spec(TINY_XL), unet_spec(TINY_15)
    assert [t.name for t in xl.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t.name for t in sd.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert xl.inputs[2].shape == ("batch", 77, 64) and xl.inputs[3].shape == ("batch", 32)
    assert [t.name for t in xl.outputs] == ["eps"]
    assert xl.dynamic_axes()["sample"] == {0: "batch", 2: "height", 3: "width"}
    assert xl.dynamic_axes()["eps"] == {0: "batch", 2: "height", 3: "width"}
    assert "timestep" not in xl.dynamic_axes()


def test_fp16_keeps_timestep_and_time_ids_in_fp32():
    s = unet_spec(SDXL, "fp16", dilation=2)
    dtypes = {t.name: t.dtype for t in (*s.inputs, *s.outputs)}
    assert dtypes == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
                      "text_embeds": "float16", "time_ids": "float32", "eps": "float16"}
    assert (s.variant, s.dilation, s.name) == ("dilated", 2, "unet-dilated-fp16")


def test_text_encoders_and_pooled_output():
    one, two = text_encoder_specs(SDXL)
    assert [t.name for t in one.outputs] == ["hidden_states"] and one.outputs[0].shape == ("batch", 77, 768)
    assert [t.name for t in two.outputs] == ["hidden_states", "pooled"]
    assert two.outputs[1].shape == ("batch", 1280) and two.network == "text_encoder_2"
    assert one.inputs[0].dtype == "int32"
    assert len(text_encoder_specs(get_family("sd15"))) == 1


def test_vae_axes_are_latent_and_pixel():
    enc, dec = vae_specs(TINY_XL)
    assert enc.inputs[0].shape == ("batch", 3, "image_height", "image_width")
    assert enc.outputs[0].shape == dec.inputs[0].shape == ("batch", 4, "height", "width")


def test_plan_requirements_tiny_sdxl():
    reqs = by_name(plan_requirements(TINY_XL, two_stage(TINY_XL)))
    assert set(reqs) == {"text_encoder-fp32", "text_encoder_2-fp32", "unet-standard-fp32", "unet-dilated-fp32",
                         "vae_decoder-fp32", "vae_encoder-fp32"}
    std, dil = reqs["unet-standard-fp32"].profiles, reqs["unet-dilated-fp32"].profiles
    assert [p.stage for p in std] == [0] and [p.stage for p in dil] == [1]
    assert std[0].shapes[0] == ("sample", (1, 4, 16, 16), (2, 4, 16, 16), (2, 4, 16, 16))
    assert dil[0].shapes[0] == ("sample", (1, 4, 32, 32), (2, 4, 32, 32), (2, 4, 32, 32))
    assert dil[0].shapes[4] == ("time_ids", (1, 6), (2, 6), (2, 6))
    assert [p.shapes[0][2] for p in reqs["vae_decoder-fp32"].profiles] == [(1, 4, 16, 16), (1, 4, 32, 32)]
    assert [p.shapes[0][2] for p in reqs["vae_encoder-fp32"].profiles] == [(1, 3, 256, 256)]
    assert reqs["text_encoder-fp32"].profiles[0].shapes == (("input_ids", (1, 77), (1, 77), (2, 77)),)


def test_real_sdxl_default_plan_profiles():
    plan = validate_plan(SDXL, [Stage(1024, 1024, 40), Stage(2048, 2048, 10)])
    reqs = by_name(plan_requirements(SDXL, plan, "fp16"))
    assert reqs["unet-standard-fp16"].profiles[0].shapes[0][2] == (2, 4, 128, 128)
    assert reqs["unet-dilated-fp16"].profiles[0].shapes[0][2] == (2, 4, 256, 256)
    # SDXL's VAE overflows in fp16: fp32 unless asked otherwise; SD1.5's follows the engines.
    assert "vae_decoder-fp32" in reqs and "vae_encoder-fp32" in reqs
    sd = by_name(plan_requirements(get_family("sd15"), validate_plan(get_family("sd15"), [Stage(512, 512, 1)]), "fp16"))
    assert "vae_decoder-fp16" in sd


def test_vae_precision_overrides_and_no_dilation():
    plan = two_stage(TINY_XL)
    reqs = by_name(plan_requirements(TINY_XL, plan, "fp16", dilation=1, vae_precision="fp32"))
    assert "unet-dilated-fp16" not in reqs
    assert [p.stage for p in reqs["unet-standard-fp16"].profiles] == [0, 1]
    assert reqs["vae_decoder-fp32"].spec.inputs[0].dtype == "float32"
    assert reqs["unet-standard-fp16"].spec.inputs[0].dtype == "float16"


def test_latent_relay_needs_no_encoder_and_one_decode():
    reqs = by_name(plan_requirements(TINY_XL, two_stage(TINY_XL), relay="latent"))
    assert "vae_encoder-fp32" not in reqs
    assert [p.stage for p in reqs["vae_decoder-fp32"].profiles] == [1]


def test_equal_stage_sizes_share_one_profile():
    plan = validate_plan(TINY_15, [Stage(128, 128, 2), Stage(256, 256, 2), Stage(256, 256, 1)])
    reqs = by_name(plan_requirements(TINY_15, plan))
    assert [p.stage for p in reqs["unet-dilated-fp32"].profiles] == [1]


def test_sample_inputs_match_the_spec():
    spec = unet_spec(TINY_XL, "fp16")
    axes = spec.axes(2, 16, 24, TINY_XL.vae_scale)
    xs = spec.sample_inputs(axes)
    assert [tuple(x.shape) for x in xs] == [t.concrete(axes) for t in spec.inputs]
    assert [x.dtype for x in xs] == [torch.float16, torch.float32, torch.float16, torch.float16, torch.float32]
    assert xs[4][0].tolist() == [128.0, 192.0, 0.0, 0.0, 128.0, 192.0]
    ids = text_encoder_specs(TINY_XL)[0].sample_inputs(axes)[0]
    assert ids.dtype == torch.int32 and ids.shape == (2, 77)


def test_profile_json_round_trip_and_cover():
    p = plan_requirements(TINY_XL, two_stage(TINY_XL))[2].profiles[0]
    assert ShapeProfile.from_json(p.to_json()) == p
    assert p.covers("sample", (1, 4, 16, 16)) and p.covers("sample", (2, 4, 16, 16))
    assert not p.covers("sample", (2, 4, 32, 32)) and not p.covers("nope", (1,))


def test_network_spec_by_name():
    assert network_spec(TINY_XL, "text_encoder_2", "fp32").outputs[1].name == "pooled"
    assert network_spec(TINY_XL, "unet", "fp32", 2).variant == "dilated"
    with pytest.raises(ValueError, match="text_encoder_2"):
        network_spec(TINY_15, "text_encoder_2", "fp32")


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        unet_spec(TINY_XL).precision = "fp16"
