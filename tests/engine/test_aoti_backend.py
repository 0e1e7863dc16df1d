"""AOTInductor backend: `mf-build-engines --backend aoti` packages for tiny-sd15 (the session fixture
`sd15_aoti` of tests/conftest.py, about a minute per network on CPU), a full MegaFusion generation from them
against the torch backend, and sizes outside the compiled range refused with that range.

Tolerance as the ONNX Runtime test: final latents within 1e-3 absolute (fp32 end to end), images within 1 level.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.engine.aoti_backend import AotiRunner
from megafusion.engine.cache import EngineCache
from megafusion.engine.load import CoverageError, open_engines
from megafusion.engine.networks import TorchNetworks
from megafusion.engine.runners import EngineNetworks
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.runtime.pipeline import GenerationOptions

from tests.engines import LATENT_ATOL, STAGES, assert_generation_matches_torch

pytestmark = pytest.mark.slow


def test_manifest_records_packages(sd15_aoti):
    entries = list(EngineCache(sd15_aoti).entries().values())
    names = sorted((e.key.network, e.key.variant) for e in entries)
    assert names == [("text_encoder", "standard"), ("unet", "dilated"), ("unet", "standard"),
                     ("vae_decoder", "standard"), ("vae_encoder", "standard")]
    for e in entries:
        assert e.key.backend == "aoti" and e.key.backend_version == torch.__version__
        assert [f.path.rsplit("/", 1)[1] for f in e.files] == ["model.pt2"]
        assert len(e.key.profiles) == 1  # one range, not one profile per stage


@pytest.mark.parametrize("relay", ["pixel", "latent"])
def test_generation_matches_torch(tiny_sd15, sd15_aoti, relay):
    plan = validate_plan(tiny_sd15.family, parse_stages(STAGES))
    opts = GenerationOptions("a red cube", negative_prompt="blurry", seed=3, relay=relay)
    nets, desc = open_engines(sd15_aoti, tiny_sd15, plan, relay=relay)
    assert isinstance(nets, EngineNetworks) and desc.startswith("aoti")
    assert all(isinstance(r, AotiRunner) for r in nets.runners.values())
    assert_generation_matches_torch(tiny_sd15, nets, plan, opts)


def test_other_plans_inside_the_range_open(tiny_sd15, sd15_aoti):
    # One package per network serves any stage sizes in the range, other aspect ratios included.
    plan = validate_plan(tiny_sd15.family, parse_stages("128x128:3,256x192:1"))
    nets, _ = open_engines(sd15_aoti, tiny_sd15, plan)
    ref = TorchNetworks(tiny_sd15)
    g = torch.Generator().manual_seed(6)
    lat, ehs = torch.randn(1, 4, 24, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    out, want = nets.vae_decode(lat), ref.vae_decode(lat)
    assert out.shape == (1, 3, 192, 256) and want.abs().max() > 0.1
    assert (out - want).abs().max() <= LATENT_ATOL
    sample = torch.cat([lat, lat])
    eps, want = nets.unet(sample, torch.tensor(501), ehs, None, None, 2), ref.unet(sample, torch.tensor(501), ehs,
                                                                                    None, None, 2)
    assert want.abs().max() > 0.1 and (eps - want).abs().max() <= LATENT_ATOL


def test_size_outside_the_range_is_refused(tiny_sd15, sd15_aoti):
    plan = validate_plan(tiny_sd15.family, parse_stages("128x128:2,320x320:2"))
    with pytest.raises(CoverageError, match=r"do not cover unet \(dilated, fp32\) at 320x320; they cover "
                                            r"128x128 to 256x256 \(sides in steps of 64\)\. Build them with: "
                                            r"mf-build-engines .*--backend aoti"):
        open_engines(sd15_aoti, tiny_sd15, plan)


def test_runner_refuses_shapes_outside_the_range(tiny_sd15, sd15_aoti):
    # The compiled code checks lower bounds only: the runner checks the range itself.
    plan = validate_plan(tiny_sd15.family, parse_stages(STAGES))
    nets, _ = open_engines(sd15_aoti, tiny_sd15, plan)
    with pytest.raises(ValueError, match=r"vae_decoder-fp32: input latent of shape \(1, 4, 40, 40\) is outside "
                                         r"the compiled range \(128x128 to 256x256"):
        nets.vae_decode(torch.zeros(1, 4, 40, 40))
