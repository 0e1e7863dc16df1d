"""EngineNetworks: the dtype the pipeline draws its noise in follows the UNet engines, not the bundle."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megafusion.engine.runners import EngineNetworks
from megafusion.core.families import get_family
from megafusion.core.specs import network_spec
from megafusion.runtime.pipeline import MegaFusionPipeline


def _nets(precision: str) -> EngineNetworks:
    fam = get_family("tiny-sd15")
    runners = {("unet", d): SimpleNamespace(spec=network_spec(fam, "unet", precision, d)) for d in (1, 2)}
    runners[("vae_decoder", 1)] = SimpleNamespace(spec=network_spec(fam, "vae_decoder", "fp32"))
    return EngineNetworks(runners, torch.device("cpu"))


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("fp32", torch.float32)])
def test_unet_dtype_is_the_unet_engines_sample_dtype(precision, dtype):
    assert _nets(precision).unet_dtype == dtype


def test_pipeline_draws_noise_in_the_engines_dtype_not_the_bundles(tiny_sd15):
    """An fp32 bundle (hashed as loaded) with fp16 engines: noise in fp16, as libmegafusion draws it."""
    assert tiny_sd15.unet.dtype == torch.float32
    assert MegaFusionPipeline(tiny_sd15, _nets("fp16")).noise_dtype == torch.float16
    assert MegaFusionPipeline(tiny_sd15).noise_dtype == torch.float32  # torch modules: the bundle's dtype
