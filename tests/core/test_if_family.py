"""DeepFloyd IF: the built-in T5 tokenizer, the family's architectures, random and saved weights."""
from __future__ import annotations

import json

import pytest
import torch

from megafusion.core.if_family import IF, IF_FAMILIES, TINY_IF, get_if_family
from megafusion.core.if_loading import build_random_if, load_if_model, load_if_pretrained
from megafusion.core.loading import WeightsError
from megafusion.core.tiny_t5 import EOS_ID, PAD_ID, UNK_ID, tiny_t5_config, tiny_t5_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_if():
    return build_random_if(TINY_IF, seed=0)


def test_tiny_t5_tokenizer_numbers_as_t5():
    tok = tiny_t5_tokenizer(77)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    enc = tok("a red fox", padding="max_length", max_length=10, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 10
    n = sum(enc.attention_mask)
    assert ids[n - 1] == EOS_ID and all(i == PAD_ID for i in ids[n:]) and n >= 4  # words, eos, then padding
    assert UNK_ID not in ids  # known words and ASCII never fall to unk
    assert tok("\u00e9\u00e9").input_ids[-2] == UNK_ID
    long = tok("word " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == EOS_ID  # truncation keeps the eos, as T5's does
    assert tok.model_max_length == 77


def test_tiny_t5_config_builds_an_encoder_that_fits_the_tokenizer():
    from transformers import T5Config, T5EncoderModel

    cfg = tiny_t5_config(num_layers=1)
    assert cfg["num_layers"] == 1 and cfg["vocab_size"] == len(tiny_t5_tokenizer(77))
    enc = T5EncoderModel(T5Config(**cfg))
    out = enc(torch.tensor([[5, 6, EOS_ID, PAD_ID]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))[0]
    assert out.shape == (1, 4, cfg["d_model"])


def test_real_configs_are_if_i_xl_and_if_ii_l():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        n1 = sum(p.numel() for p in UNet2DConditionModel(**IF.unet_1).parameters())
        n2 = sum(p.numel() for p in UNet2DConditionModel(**IF.unet_2).parameters())
    assert abs(n1 / 4.3e9 - 1) < 0.01 and abs(n2 / 1.2e9 - 1) < 0.02  # the published 4.3B and 1.2B
    assert (IF.native_1, IF.native_2) == (64, 256)
    assert IF.stages_1 == ((64, 64, 80), (128, 128, 20)) and IF.stages_2 == ((256, 256, 40), (512, 512, 10))


def test_tiny_if_shapes(tiny_if):
    states = torch.randn(2, 77, TINY_IF.text_encoder["d_model"])
    with torch.no_grad():
        out1 = tiny_if.unet_1(torch.randn(2, 3, 16, 16), 10, encoder_hidden_states=states).sample
        out2 = tiny_if.unet_2(torch.randn(2, 6, 64, 64), 10, encoder_hidden_states=states,
                              class_labels=torch.tensor([250, 250])).sample
    assert out1.shape == (2, 6, 16, 16) and out2.shape == (2, 6, 64, 64)  # eps and the variance channels
    assert get_if_family("tiny-if") is TINY_IF and set(IF_FAMILIES) == {"if", "tiny-if"}
    with pytest.raises(ValueError, match="unknown IF model 'nope'"):
        get_if_family("nope")


def test_random_weights_are_seeded(tiny_if):
    again = build_random_if(TINY_IF, seed=0)
    other = build_random_if(TINY_IF, seed=1)
    w = next(tiny_if.unet_2.parameters())
    assert torch.equal(w, next(again.unet_2.parameters()))
    assert not torch.equal(w, next(other.unet_2.parameters()))


def save_tiny_folders(bundle, root):
    """The tiny cascade saved as diffusers saves IF: an IFPipeline and an IFSuperResolutionPipeline folder."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    fam = bundle.family
    common = dict(tokenizer=bundle.tokenizer, text_encoder=bundle.text_encoder, safety_checker=None,
                  feature_extractor=None, watermarker=None, requires_safety_checker=False)
    IFPipeline(unet=bundle.unet_1, scheduler=DDPMScheduler(**fam.scheduler_1), **common).save_pretrained(
        root / "stage_I")
    IFSuperResolutionPipeline(unet=bundle.unet_2, scheduler=DDPMScheduler(**fam.scheduler_2),
                              image_noising_scheduler=DDPMScheduler(**fam.noising_scheduler),
                              **common).save_pretrained(root / "stage_II")
    return root / "stage_I", root / "stage_II"


def test_saved_folders_load_back(tiny_if, tmp_path):
    s1, s2 = save_tiny_folders(tiny_if, tmp_path)
    loaded = load_if_pretrained(TINY_IF, s1, s2)
    for a, b in ((tiny_if.unet_1, loaded.unet_1), (tiny_if.unet_2, loaded.unet_2),
                 (tiny_if.text_encoder, loaded.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.tokenizer("a red fox").input_ids == tiny_if.tokenizer("a red fox").input_ids
    assert loaded.family.scheduler_1["sample_max_value"] == 1.5 and loaded.family.scheduler_2["sample_max_value"] == 1.0
    assert loaded.family.unet_2["in_channels"] == 6
    only_1 = load_if_model("tiny-if", str(s1))
    assert only_1.unet_2 is None and str(s1) in only_1.source


def test_bad_folders_say_what_is_wrong(tiny_if, tmp_path):
    s1, s2 = save_tiny_folders(tiny_if, tmp_path)
    with pytest.raises(WeightsError, match="not a diffusers model folder"):
        load_if_pretrained(TINY_IF, tmp_path)
    with pytest.raises(WeightsError, match="holds a IFSuperResolutionPipeline, not an IFPipeline"):
        load_if_pretrained(TINY_IF, s2)
    index = s1 / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(WeightsError, match="StableDiffusionPipeline, not an IFPipeline"):
        load_if_pretrained(TINY_IF, s1)
    with pytest.raises(WeightsError, match="needs the stage I folder"):
        load_if_model("tiny-if", None, str(s2))
    with pytest.raises(WeightsError, match="if needs --model-path DIR"):
        load_if_model("if")
