"""The IP-Adapter image encoder's spec (core/image_encoder_specs.py): I/O from the CLIP vision config, one fixed
profile, the image processor's steps as models.json records them; and its engine key, whose weights field is the
encoder folder's fingerprint (engine/image_encoder_engines.py)."""
from __future__ import annotations

import pytest

from megafusion.core.image_encoder_specs import (IMAGE_ENCODER, image_encoder_requirement, preprocess_facts,
                                                 spec_of_config)
from tests.runtime.test_ipadapter import CLIP_DIM, save_tiny_image_encoder


def test_spec_from_the_encoder_config(tmp_path):
    from megafusion.core.image_encoder import read_encoder_config

    cfg = read_encoder_config(save_tiny_image_encoder(tmp_path / "enc"))
    spec = spec_of_config(cfg, "fp16")
    assert spec.network == IMAGE_ENCODER and spec.name == "image_encoder-fp16"
    ((name, dtype, shape),) = [(t.name, t.dtype, t.shape) for t in spec.inputs]
    assert (name, dtype, shape) == ("pixel_values", "float16", (1, 3, cfg.image_size, cfg.image_size))
    assert [(t.name, t.shape) for t in spec.outputs] == [("image_embeds", (1, CLIP_DIM))]
    (x,) = spec.sample_inputs({})
    assert x.shape == (1, 3, 32, 32) and x.dtype.is_floating_point
    (profile,) = image_encoder_requirement(spec).profiles
    assert profile.shapes == (("pixel_values", (1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 32)),)


def test_preprocess_facts_are_the_processor_config(tmp_path):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 38}, resample=2,
                              image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.25, 0.125], do_center_crop=False)
    proc.save_pretrained(str(tmp_path))
    from megafusion.core.image_encoder import load_image_processor

    facts = preprocess_facts(load_image_processor(tmp_path))  # as saved and read back
    assert facts == {"do_resize": True, "size": {"shortest_edge": 40}, "resample": 2, "do_center_crop": False,
                     "crop_size": {"height": 36, "width": 38}, "do_rescale": True, "rescale_factor": 1 / 255,
                     "do_normalize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.25, 0.125]}


def test_key_holds_the_encoder_folder_fingerprint(tmp_path):
    """Same files: same key; other weights or another preprocessor config: another key."""
    import json

    import torch
    from transformers import CLIPVisionModelWithProjection

    from megafusion.core.image_encoder import read_encoder_config
    from megafusion.engine.image_encoder_engines import encoder_fingerprint, encoder_key

    a, b = save_tiny_image_encoder(tmp_path / "a"), save_tiny_image_encoder(tmp_path / "b")
    spec = spec_of_config(read_encoder_config(a))
    key = lambda folder: encoder_key("tiny-sd15", spec, "aoti", "2.13.0", "cpu", encoder_fingerprint(folder))
    assert key(a).weights.startswith("mf2:files:") and key(a).network == IMAGE_ENCODER
    assert key(a).digest() == key(b).digest()
    m = CLIPVisionModelWithProjection.from_pretrained(str(b))
    with torch.no_grad():
        m.visual_projection.weight.add_(1e-3)
    m.save_pretrained(str(b))
    assert key(a).digest() != key(b).digest()
    c = save_tiny_image_encoder(tmp_path / "c")
    cfg = json.loads((c / "preprocessor_config.json").read_text())
    (c / "preprocessor_config.json").write_text(json.dumps({**cfg, "image_std": [0.5, 0.5, 0.5]}))
    assert key(a).digest() != key(c).digest()


@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("fp16", "float16")])
def test_precision_sets_both_ends(precision, dtype, tmp_path):
    from megafusion.core.image_encoder import read_encoder_config

    spec = spec_of_config(read_encoder_config(save_tiny_image_encoder(tmp_path / "e")), precision)
    assert spec.inputs[0].dtype == spec.outputs[0].dtype == dtype
