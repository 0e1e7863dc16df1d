"""`engines_bundle`: the bundle of a run whose every network is an engine equals `load_model(skip=COMPONENTS)`'s in
everything the engines path reads (family, source, origins and so the weights fingerprints, configs, token ids),
without building a module."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.engine_bundle import EngineComponent, engines_bundle
from megafusion.core.loading import COMPONENTS, WeightsError, component_modules, library_version, load_model
from megafusion.engine.fingerprint import network_fingerprint
from megafusion.runtime.conditioning import token_ids

from tests.core.test_loading import _save

ALL = frozenset(COMPONENTS)
PROMPTS = ("a red fox", "", "A  Lighthouse,\tat DUSK!! 'twas café", "x " * 100)  # case, spaces, accents, truncation


def _plain(value):
    """Config values as JSON has them (diffusers keeps the class defaults' tuples, config.json gives lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _assert_same(light, full):
    assert light.family == full.family and light.source == full.source
    assert light.skipped == set(component_modules(full)) <= full.skipped  # (a folder's load also names
    # text_encoder_2 for SD1.5)
    assert light.origins == full.origins
    networks = ["unet", "vae_decoder", "text_encoder"] + (["text_encoder_2"] if full.family.is_xl else [])
    for network in networks:  # what open_engines checks every entry against
        assert network_fingerprint(light, network) == network_fingerprint(full, network)
    for lm, fm in zip((light.unet, light.vae, *light.text_encoders), (full.unet, full.vae, *full.text_encoders)):
        assert isinstance(lm, EngineComponent) and not list(lm.parameters())
        assert lm.dtype == fm.dtype and lm.device == fm.device
        config = fm.config if isinstance(fm.config, dict) else fm.config.to_dict()  # diffusers' or transformers'
        keys = [k for k in config if not k.startswith("_")]
        assert len(keys) > 10
        for k in keys:  # every key the module's config holds, the class defaults included
            assert _plain(lm.config[k]) == _plain(config[k]), k
    assert light.vae.config.scaling_factor == full.vae.config.scaling_factor  # attribute access, as the pipeline
    assert len(light.tokenizers) == len(full.tokenizers) == len(full.text_encoders)
    for a, b in zip(light.tokenizers, full.tokenizers):
        for p in PROMPTS:
            assert torch.equal(token_ids(a, p, "cpu"), token_ids(b, p, "cpu"))


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_random_weights_bundle_equals_the_skipped_load(model):
    _assert_same(engines_bundle(model, seed=3), load_model(model, seed=3, skip=ALL))


def test_real_size_sdxl_random_weights():
    light = engines_bundle("sdxl", random_weights=True)
    full = load_model("sdxl", random_weights=True, skip=ALL)  # meta device: configs only, no weights drawn
    _assert_same(light, full)


def test_folder_bundle_reads_configs_not_weights(tiny_sd15, tmp_path):
    _save(tiny_sd15, tmp_path)
    for n in ("unet", "vae", "text_encoder"):  # would fail to load: nothing here reads them
        for f in (tmp_path / n).glob("*.safetensors"):
            f.write_bytes(b"not read")
    _assert_same(engines_bundle("tiny-sd15", str(tmp_path)), load_model("tiny-sd15", str(tmp_path), skip=ALL))


def test_what_it_does_not_cover():
    assert engines_bundle("sdxl") is None  # a hub id: its engines are checked against the downloaded tensors
    assert engines_bundle("tiny-flux") is None
    with pytest.raises(WeightsError, match="exclude each other"):
        engines_bundle("tiny-sd15", "/nowhere", random_weights=True)
    with pytest.raises(WeightsError, match="does not exist"):
        engines_bundle("tiny-sd15", "/nowhere/at/all")


def test_a_placeholder_refuses_to_run_and_names_itself():
    bundle = engines_bundle("tiny-sd15")
    with pytest.raises(RuntimeError, match="unet runs from engines"):
        bundle.unet(torch.zeros(1))
    with pytest.raises(AttributeError, match="no 'no_such_key'"):
        bundle.vae.config.no_such_key


@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_library_version_is_the_module_version(library):
    import importlib
    from importlib.metadata import version

    assert version(library) == importlib.import_module(library).__version__ == library_version(library)
