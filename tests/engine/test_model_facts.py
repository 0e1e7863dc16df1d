"""models.json: every build records the facts a runtime without the Python model needs (libmegafusion), with
the weights fingerprints of the entries it built; a later build of some networks keeps the others; a corrupt
file is refused by name."""
from __future__ import annotations

import json

import pytest

from megafusion.engine.cache import CorruptManifestError, EngineCache
from megafusion.engine.model_facts import MODELS, read_models, record_model

from tests.engines import build


def test_build_records_facts(tiny_sdxl, tmp_path):
    build(tiny_sdxl, tmp_path, backend="torch")
    rec = read_models(tmp_path)["tiny-sdxl"]
    assert rec["vae_scaling_factor"] == pytest.approx(tiny_sdxl.vae.config.scaling_factor)
    assert rec["vocab_sizes"] == [te.config.vocab_size for te in tiny_sdxl.text_encoders]
    entries = EngineCache(tmp_path).entries().values()
    assert {e.key.network: e.key.weights for e in entries} == rec["weights"]
    assert set(rec["weights"]) == {"unet", "vae_decoder", "vae_encoder", "text_encoder", "text_encoder_2"}


def test_partial_record_keeps_other_networks(tiny_sd15, tmp_path):
    cache = EngineCache(tmp_path)
    record_model(cache, tiny_sd15, {"unet": "a", "vae_decoder": "b"})
    rec = record_model(cache, tiny_sd15, {"unet": "c"})
    assert rec["weights"] == {"unet": "c", "vae_decoder": "b"}
    assert read_models(tmp_path)["tiny-sd15"]["weights"] == rec["weights"]


@pytest.mark.parametrize("text", ["{\"format\": 1, \"models\": {", json.dumps({"format": 9, "models": {}})])
def test_corrupt_file_named(tiny_sd15, tmp_path, text):
    (tmp_path / MODELS).write_text(text)
    with pytest.raises(CorruptManifestError, match=str(tmp_path / MODELS)):
        read_models(tmp_path)
    with pytest.raises(CorruptManifestError):
        record_model(EngineCache(tmp_path), tiny_sd15, {"unet": "x"})
