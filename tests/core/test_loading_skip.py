"""Loading only what runs in torch (`load_model(skip=)`): skipped components are built on the meta device from
their configs, the others are the same weights as a full load, and each component's origin is recorded."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import COMPONENTS, WeightsError, component_modules, component_seed, load_model

from tests.core.test_loading import _save


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_components_are_drawn_apart():
    tiny_sdxl = load_model("tiny-sdxl")  # not the session's: other tests change its modules in place
    part = load_model("tiny-sdxl", skip=frozenset({"unet", "vae"}))
    assert part.skipped == {"unet", "vae"}
    assert all(t.device.type == "meta" for t in (*part.unet.parameters(), *part.vae.parameters()))
    assert part.unet.config == tiny_sdxl.unet.config and part.vae.config == tiny_sdxl.vae.config
    for a, b in zip(part.text_encoders, tiny_sdxl.text_encoders):  # not shifted by the components skipped
        assert _same(a, b)
    assert len({component_seed(0, n) for n in COMPONENTS}) == 4 and component_seed(0, "unet") == 0
    assert part.origins == tiny_sdxl.origins and part.origins["unet"].kind == "random"


def test_folder_components_skipped_read_no_weights(tiny_sd15, tmp_path, monkeypatch):
    _save(tiny_sd15, tmp_path)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")  # would fail to load
    part = load_model("tiny-sd15", model_path=str(tmp_path), skip=frozenset({"unet"}))
    assert all(t.device.type == "meta" for t in part.unet.parameters())
    assert part.unet.config["block_out_channels"] == tiny_sd15.unet.config["block_out_channels"]
    assert _same(part.vae, tiny_sd15.vae) and _same(part.text_encoders[0], tiny_sd15.text_encoders[0])
    assert {n: o.folder for n, o in part.origins.items()} == {
        n: str(tmp_path.resolve() / n) for n in component_modules(part)}
    with pytest.raises(WeightsError, match="could not load tiny-sd15 weights"):
        load_model("tiny-sd15", model_path=str(tmp_path))  # the broken file is really there


def test_origin_is_dropped_once_weights_change_in_place():
    bundle = load_model("tiny-sd15")
    assert bundle.origin_of("unet") is not None and bundle.origin_of("vae_encoder") is bundle.origins["vae"]
    bundle.unet.to(memory_format=torch.channels_last)
    bundle.vae.to(torch.float64)  # moved or cast: the values are still the origin's
    assert bundle.origin_of("unet") is not None and bundle.origin_of("vae_decoder") is not None
    with torch.no_grad():
        next(bundle.unet.parameters()).mul_(2.0)
    assert bundle.origin_of("unet") is None and bundle.origin_of("text_encoder") is not None
    bundle.vae.load_state_dict(bundle.vae.state_dict())
    assert bundle.origin_of("vae_decoder") is None
