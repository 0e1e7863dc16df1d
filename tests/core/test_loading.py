"""Loading weights: a saved diffusers folder round-trips; bad folders and names give clear errors; the native
size comes from the model's own config (UNet sample_size times the VAE scale), read before any weights."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megafusion.core.families import FAMILIES, TINY_SD15, UnknownModelError
from megafusion.core.loading import (
    WeightsError,
    build_random,
    family_for_config,
    load_model,
    resolve_family,
)
from megafusion.core.plan import PlanError, Stage, default_plan, validate_plan


def _save(bundle, path, safe=True):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from megafusion.core.families import SD_SCHEDULER_CONFIG

    sched = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    if bundle.family.is_xl:
        pipe = StableDiffusionXLPipeline(bundle.vae, bundle.text_encoders[0], bundle.text_encoders[1],
                                         bundle.tokenizers[0], bundle.tokenizers[1], bundle.unet, sched,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(bundle.vae, bundle.text_encoders[0], bundle.tokenizers[0], bundle.unet,
                                       sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=safe)
    return pipe


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl"])
def test_saved_folder_round_trips(name, request, tmp_path):
    bundle = request.getfixturevalue(name)
    _save(bundle, tmp_path)
    loaded = load_model(bundle.family.name, model_path=str(tmp_path))
    assert loaded.source == str(tmp_path)
    for a, b in zip((bundle.unet, bundle.vae, *bundle.text_encoders), (loaded.unet, loaded.vae, *loaded.text_encoders)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.tokenizers[0]("a fox").input_ids == bundle.tokenizers[0]("a fox").input_ids
    # its config gives the built-in native size: the family is the built-in one, before and after loading
    assert resolve_family(bundle.family.name, str(tmp_path)) is bundle.family is loaded.family


def test_pickle_only_folder_refused_unless_allowed(tiny_sd15, tmp_path):
    _save(tiny_sd15, tmp_path, safe=False)
    with pytest.raises(WeightsError, match="--allow-pickle"):
        load_model("tiny-sd15", model_path=str(tmp_path))
    assert load_model("tiny-sd15", model_path=str(tmp_path), allow_pickle=True).unet is not None


def test_wrong_kind_and_broken_folders(tiny_sd15, tmp_path):
    _save(tiny_sd15, tmp_path)
    with pytest.raises(WeightsError, match="not a sdxl model"):
        load_model("tiny-sdxl", model_path=str(tmp_path))
    (tmp_path / "model_index.json").write_text("{broken")
    with pytest.raises(WeightsError, match="model_index.json"):
        load_model("tiny-sd15", model_path=str(tmp_path))


def test_missing_path_and_unknown_model(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*--random-weights"):
        load_model("sd15", model_path=str(tmp_path / "nope"))
    with pytest.raises(WeightsError, match="model_index.json is missing"):
        load_model("sd15", model_path=str(tmp_path))
    with pytest.raises(UnknownModelError, match="'sd2'.*sd15"):
        load_model("sd2")


def test_no_weights_offline_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="stable-diffusion-v1-5.*--model-path.*--random-weights"):
        load_model("sd15")


def test_random_weights_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = load_model("tiny-sd15", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = load_model("tiny-sd15", seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
    assert json.loads(json.dumps(a.source)) == "random:7"


# --- the native size comes from the model's config ------------------------------------------------------

def _sizes(plan):
    return [(s.height, s.width, s.steps) for s in plan.stages]


def test_builtin_families_agree_with_their_own_configs():
    for fam in FAMILIES.values():
        if fam.kind in ("sd3", "flux"):
            continue  # no UNet: tests/core/test_dit_families.py checks the transformer families
        assert fam.unet["sample_size"] * fam.vae_scale == fam.native_height == fam.native_width
        assert family_for_config(fam, fam.unet, fam.vae, fam.name) is fam


def test_native_size_follows_the_folders_unet_sample_size(tmp_path):
    """A tiny-sd15 folder whose UNet config says sample_size 8: native 64x64, not the built-in 128x128. The
    folder is planned against before loading: stage 1 follows it, and a 64x64 stage 1, which the built-in family
    refuses, is accepted; the loaded bundle carries the same family and runs that plan."""
    from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

    _save(build_random(dataclasses.replace(TINY_SD15, unet={**TINY_SD15.unet, "sample_size": 8})), tmp_path)
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["sample_size"] == 8
    fam = resolve_family("tiny-sd15", str(tmp_path))
    assert (fam.native_height, fam.native_width) == (64, 64)
    assert (TINY_SD15.native_height, TINY_SD15.native_width) == (128, 128)  # the built-in family is unchanged
    assert _sizes(default_plan(TINY_SD15)) == [(128, 128, 40), (192, 192, 5), (256, 256, 5)]
    # the default plan: stage 1 at the folder's native size, output 2x it per side (the middle stage rounds to
    # 128 = the last, and is merged into it)
    assert _sizes(default_plan(fam)) == [(64, 64, 40), (128, 128, 10)]
    assert _sizes(default_plan(fam, 192, 128)) == [(64, 64, 40), (128, 128, 5), (128, 192, 5)]  # W x H = 192x128
    stages = [Stage(64, 64, 2), Stage(128, 128, 1)]
    with pytest.raises(PlanError, match="stage 1 \\(64x64\\) is smaller than tiny-sd15's native 128x128"):
        validate_plan(TINY_SD15, stages)
    plan = validate_plan(fam, stages)
    with pytest.raises(PlanError, match="size 48x48 is smaller than tiny-sd15's native 64x64"):
        default_plan(fam, 48, 48)  # the folder's native size is the floor now

    loaded = load_model("tiny-sd15", model_path=str(tmp_path))
    assert loaded.family == fam
    assert loaded.unet.config.sample_size * 2 ** (len(loaded.vae.config.block_out_channels) - 1) == 64
    out = MegaFusionPipeline(loaded).generate(plan, GenerationOptions("a fox", seed=0))
    assert out.image.shape == (128, 128, 3)


def test_native_size_from_a_height_width_pair_and_refusals(tiny_sd15, tmp_path):
    _save(tiny_sd15, tmp_path)
    cfg_path = tmp_path / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "sample_size": [8, 16]}))  # [height, width], as diffusers reads it
    fam = resolve_family("tiny-sd15", str(tmp_path))
    assert (fam.native_height, fam.native_width) == (64, 128)
    assert _sizes(default_plan(fam))[0] == (64, 128, 40)
    assert validate_plan(fam, [Stage(64, 128, 1)]).stages[0] == Stage(64, 128, 1)
    with pytest.raises(PlanError, match="smaller than tiny-sd15's native"):
        validate_plan(TINY_SD15, [Stage(64, 128, 1)])
    # a hub id (no such local path) plans with the built-in family; loading takes the downloaded config
    assert resolve_family("tiny-sd15", "someone/some-model") is TINY_SD15
    assert resolve_family("tiny-sd15") is TINY_SD15
    # a VAE of another scale is not this family's model; a broken config says which file
    vae_path = tmp_path / "vae" / "config.json"
    vae = json.loads(vae_path.read_text())
    vae_path.write_text(json.dumps({**vae, "block_out_channels": vae["block_out_channels"][:3]}))
    with pytest.raises(WeightsError, match="VAE scale of 4 .* not a tiny-sd15 model"):
        resolve_family("tiny-sd15", str(tmp_path))
    vae_path.write_text(json.dumps(vae))
    cfg_path.write_text(json.dumps({**cfg, "sample_size": [8]}))
    with pytest.raises(WeightsError, match="sample_size \\[8\\] is neither an int nor a \\[height, width\\] pair"):
        resolve_family("tiny-sd15", str(tmp_path))
    cfg_path.write_text("{broken")
    with pytest.raises(WeightsError, match="unet/config.json could not be read"):
        resolve_family("tiny-sd15", str(tmp_path))
    with pytest.raises(WeightsError, match="model_index.json is missing"):
        resolve_family("tiny-sd15", str(tmp_path / "unet"))


def test_local_folder_load_prints_no_accelerate_banner(tiny_sd15, tmp_path):
    import logging

    _save(tiny_sd15, tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append  # diffusers' logger does not propagate to the root
    logging.getLogger("diffusers").addHandler(handler)
    try:
        load_model("tiny-sd15", model_path=str(tmp_path))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r for r in records if "accelerate" in r.getMessage()]
