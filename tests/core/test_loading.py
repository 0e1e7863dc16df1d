"""Loading weights: a saved diffusers folder round-trips; bad folders and names give clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from megafusion.core.loading import WeightsError, load_model
from megafusion.core.families import UnknownModelError


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
