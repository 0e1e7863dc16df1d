"""A one-shot run (mf-generate --engines: one image per process) drops its text encoders' engines once the prompt
is encoded, so their device memory (1.5 GiB of fp16 weights for SDXL) serves the stages and the decode (#15's
16 GiB). The image is the one a pipeline that keeps them makes; a second generation stops at its prompt, naming
what was released; a pipeline that is not one-shot keeps everything."""
from __future__ import annotations

import numpy as np
import pytest

from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine.load import open_engines
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

from tests.engines import STAGES, build


@pytest.fixture(scope="module")
def torch_entries(tiny_sdxl, tmp_path_factory):
    out = tmp_path_factory.mktemp("release-te")
    build(tiny_sdxl, out, backend="torch")
    return out


def test_one_shot_releases_the_text_encoders_after_the_prompt(tiny_sdxl, torch_entries):
    plan = validate_plan(tiny_sdxl.family, parse_stages(STAGES))
    opts = GenerationOptions("a red cube", seed=5)
    kept, _ = open_engines(torch_entries, tiny_sdxl, plan)
    ref = MegaFusionPipeline(tiny_sdxl, kept, "cpu").generate(plan, opts)
    assert kept.released == set() and {"text_encoder", "text_encoder_2"} <= {n for n, _ in kept.runners}

    nets, _ = open_engines(torch_entries, tiny_sdxl, plan)
    pipe = MegaFusionPipeline(tiny_sdxl, nets, "cpu")
    pipe.one_shot = True
    got = pipe.generate(plan, opts)
    assert np.array_equal(got.image, ref.image) and ref.image.std() > 0
    assert nets.released == {"text_encoder", "text_encoder_2"}
    assert {n for n, _ in nets.runners} == {"unet", "vae_decoder", "vae_encoder"}
    with pytest.raises(RuntimeError, match="text_encoder's engine was released after this one-shot run's prompt"):
        pipe.generate(plan, opts)


def test_one_shot_torch_modules_release_the_text_encoders_after_the_prompt():
    """mf-generate's torch modes (eager, graphs, compiled) are one-shot too: the text encoders' weights go to the
    meta device after the prompt, the image is the one a pipeline that keeps them makes."""
    from megafusion.core.loading import load_model
    from megafusion.engine.networks import TorchNetworks

    bundle = load_model("tiny-sdxl")  # its own: the release changes the bundle
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    opts = GenerationOptions("a red cube", seed=5)
    ref = MegaFusionPipeline(bundle, TorchNetworks(bundle), "cpu").generate(plan, opts)
    pipe = MegaFusionPipeline(bundle, TorchNetworks(bundle), "cpu")
    pipe.one_shot = True
    got = pipe.generate(plan, opts)
    assert np.array_equal(got.image, ref.image) and ref.image.std() > 0
    assert all(p.is_meta for enc in bundle.text_encoders for p in enc.parameters())
    assert not any(p.is_meta for p in bundle.unet.parameters())
    with pytest.raises(RuntimeError, match="text encoders were released after this one-shot run's prompt"):
        pipe.generate(plan, opts)
