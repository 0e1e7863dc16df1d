"""libmegafusion on a folder built with `mf-build-engines --lora FILE` (issue #18 item 5): the LoRA is fused into
the UNet and text encoder engines, and models.json records the fused weights' fingerprints, the very keys those
entries carry. The C API picks a network's entries by the fingerprint models.json records
(cpp/src/lib/manifest.cpp select_entry_sets), so it serves such a folder as built, LoRA included; it swaps no
LoRA itself (megafusion.h). Checked here on torch-backend entries (no export: instant); the same build code
writes the aoti folder's keys and models.json.
"""
from __future__ import annotations

import json

from megafusion.cli import build_engines as build_cli
from megafusion.core.loading import load_model
from megafusion.engine.cache import EngineCache

from ..conftest import AOTI_STAGES
from ..core.test_lora import _random_lora, save_diffusers


def _facts(folder) -> dict[str, str]:
    return json.loads((folder / "models.json").read_text())["models"]["tiny-sd15"]["weights"]


def test_models_json_records_the_fused_fingerprints(tmp_path):
    lora = save_diffusers(_random_lora(load_model("tiny-sd15")), tmp_path / "style.safetensors")
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    base = ["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "torch", "--device", "cpu"]
    assert build_cli.main([*base, "--output", str(plain)]) == 0
    assert build_cli.main([*base, "--lora", f"{lora}:0.7", "--output", str(fused)]) == 0
    facts, before = _facts(fused), _facts(plain)
    keys = {e.key.network: e.key.weights for e in EngineCache(fused).entries().values()}
    assert facts == {n: keys[n] for n in facts}  # what the C API selects by is what the entries carry
    assert facts["unet"] != before["unet"] and facts["text_encoder"] != before["text_encoder"]  # the LoRA's
    assert facts["vae_decoder"] == before["vae_decoder"]  # a LoRA leaves the VAE alone
