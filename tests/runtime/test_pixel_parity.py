"""One-stage plans of each IF cascade stage against diffusers' IFPipeline and IFSuperResolutionPipeline, both
loaded from the same saved tiny folders (CPU, float32).

The schedulers compared are the ones saved with the folders: IF's DDPM with "learned_range" variance, dynamic
thresholding (0.95 quantile, cap 1.5 for stage I and 1.0 for stage II), "leading" timesteps — the config
IF-I-XL and IF-II-L ship, pinned in core/if_family.py, so the comparison exercises the variance, the
thresholding and every noise draw. Tolerance: 1e-6 relative (L2) on the final sample; on this machine the
samples are equal bit for bit, since the step coefficients follow DDPMScheduler's float32 arithmetic.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.if_family import TINY_IF
from megafusion.core.if_loading import build_random_if, load_if_pretrained
from megafusion.core.plan import Stage
from megafusion.runtime.pixel_pipeline import IFMegaFusionPipeline, PixelOptions, pixel_plan
from tests.core.test_if_family import save_tiny_folders

REL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_folders(build_random_if(TINY_IF, seed=7), tmp_path_factory.mktemp("tiny-if"))


@pytest.fixture(scope="module")
def loaded(folders):
    return load_if_pretrained(TINY_IF, *folders)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_stage_one_equals_ifpipeline(folders, loaded, guidance):
    from diffusers import IFPipeline

    ref_pipe = IFPipeline.from_pretrained(folders[0], safety_checker=None, feature_extractor=None,
                                          watermarker=None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    steps = 25
    ref = ref_pipe("A red Fox ", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(11), output_type="pt").images
    ours = IFMegaFusionPipeline(loaded).generate(
        pixel_plan(loaded.family, 1, [Stage(16, 16, steps)]), None,
        PixelOptions("A red Fox ", "blurry", guidance_1=guidance, seed=11))
    assert ours.sample_1.shape == ref.shape == (1, 3, 16, 16)
    assert _rel(ours.sample_1, ref) < REL
    assert ref.abs().max() > 0.5  # a real sample, not a degenerate one that any code would match


def test_stage_two_equals_ifsuperresolutionpipeline(folders, loaded):
    from diffusers import IFSuperResolutionPipeline

    sr = IFSuperResolutionPipeline.from_pretrained(folders[1], text_encoder=loaded.text_encoder,
                                                   tokenizer=loaded.tokenizer, safety_checker=None,
                                                   feature_extractor=None, watermarker=None,
                                                   requires_safety_checker=False)
    sr.set_progress_bar_config(disable=True)
    low = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # a stage I image
    steps = 12
    ref = sr("a lighthouse", image=low, num_inference_steps=steps, guidance_scale=4.0, noise_level=250,
             generator=torch.Generator().manual_seed(5), output_type="pt").images
    pipe = IFMegaFusionPipeline(loaded)
    opts = PixelOptions("a lighthouse", seed=5)
    states = pipe.encode(opts.prompt, "", cfg=True)
    ours = pipe.run_cascade(2, pixel_plan(loaded.family, 2, [Stage(64, 64, steps)]), states, 4.0, opts,
                            torch.Generator().manual_seed(5), low_res=low)
    assert ours.shape == ref.shape == (1, 3, 64, 64)
    assert _rel(ours, ref) < REL
    # the conditioning image matters: another stage I image gives another result
    other = pipe.run_cascade(2, pixel_plan(loaded.family, 2, [Stage(64, 64, steps)]), states, 4.0, opts,
                             torch.Generator().manual_seed(5), low_res=-low)
    assert _rel(other, ref) > 1e-3
