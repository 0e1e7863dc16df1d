"""The IP-Adapter image encoder engine (engine/image_encoder_engines.py, export/image_encoder_export.py): built by
`mf-build-engines --ip-adapter FILE --ip-adapter-encoder DIR` beside the unet_ip engines (the session's
`sd15_ip_ort` and `sd15_ip_aoti` folders), its embeddings those of the torch encoder (runtime/ipadapter.py
encode_ip_image, itself checked against diffusers in tests/runtime/test_ipadapter.py) within 1e-4 (fp32 CPU;
measured 5e-7 for both backends, embeddings of magnitude about 2.6), and its preprocessing recorded in models.json.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.engine.image_encoder_engines import encode_with_engine, encoder_fingerprint, open_image_encoder
from megafusion.runtime.ipadapter import encode_ip_image, load_image_encoder
from tests.runtime.test_ipadapter import CLIP_DIM, save_tiny_image_encoder

EMBED_ATOL = 1e-4


def _image(seed: int, h: int = 40, w: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _check_against_torch(engines, encoder, backend: str) -> None:
    runner = open_image_encoder(engines, "tiny-sd15", encoder, backend, "fp32", "cpu")
    assert runner is not None
    enc, proc = load_image_encoder(encoder, "cpu", torch.float32)
    for seed, (h, w) in ((0, (40, 48)), (1, (300, 200))):
        ref = encode_ip_image(enc, proc, _image(seed, h, w), "cpu")
        got = encode_with_engine(runner, proc, _image(seed, h, w), "cpu")
        assert got.shape == ref.shape == (1, 1, CLIP_DIM) and ref.abs().max() > 0.5
        assert torch.allclose(got, ref, rtol=0, atol=EMBED_ATOL), (got - ref).abs().max()


def test_onnxruntime_engine_equals_torch_encoder(sd15_ip_ort, ip_encoder):
    _check_against_torch(sd15_ip_ort[0], ip_encoder, "onnxruntime")


@pytest.mark.slow
def test_aoti_package_equals_torch_encoder(sd15_ip_aoti):
    engines, _, encoder = sd15_ip_aoti
    _check_against_torch(engines, encoder, "aoti")


def test_models_json_records_the_preprocessing(sd15_ip_ort, ip_encoder):
    rec = json.loads((sd15_ip_ort[0] / "models.json").read_text())["models"]["tiny-sd15"]["image_encoders"]
    facts = rec[encoder_fingerprint(ip_encoder)]
    assert facts["image_size"] == 32 and facts["projection_dim"] == CLIP_DIM
    assert facts["source"] == str(ip_encoder.resolve())
    pre = facts["preprocess"]
    assert pre["size"] == {"shortest_edge": 32} and pre["crop_size"] == {"height": 32, "width": 32}
    assert pre["resample"] == 3 and pre["rescale_factor"] == pytest.approx(1 / 255)
    assert pre["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert pre["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])


def test_no_engine_for_another_encoder_or_precision(sd15_ip_ort, ip_encoder, tmp_path):
    """None (the caller runs torch) for an encoder of other weights, another precision or backend."""
    other = save_tiny_image_encoder(tmp_path / "other")
    cfg = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps({**cfg, "crop_size": {"height": 30, "width": 30}}))
    engines = sd15_ip_ort[0]
    assert open_image_encoder(engines, "tiny-sd15", other, "onnxruntime", "fp32", "cpu") is None
    assert open_image_encoder(engines, "tiny-sd15", ip_encoder, "onnxruntime", "fp16", "cpu") is None
    assert open_image_encoder(engines, "tiny-sd15", ip_encoder, "aoti", "fp32", "cpu") is None
    assert open_image_encoder(engines, "tiny-sdxl", ip_encoder, "onnxruntime", "fp32", "cpu") is None


def test_a_damaged_engine_is_not_used(sd15_ip_ort, ip_encoder, tmp_path):
    """A file that differs from its manifest record is not run: the torch encoder runs instead."""
    out = tmp_path / "engines"
    shutil.copytree(sd15_ip_ort[0], out)
    runner = open_image_encoder(out, "tiny-sd15", ip_encoder, "onnxruntime", "fp32", "cpu")
    model = runner.path
    del runner
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    (out / "file-hashes.json").unlink(missing_ok=True)
    assert open_image_encoder(out, "tiny-sd15", ip_encoder, "onnxruntime", "fp32", "cpu") is None
