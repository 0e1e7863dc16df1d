"""A one-stage plan at native size, re-scheduling and dilation off, is diffusers' own pipeline with DDIM.

Reference: diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline with DDIMScheduler, fed the same
modules, tokenizers, prompt and seed (so the same initial latent and the same prompt embeddings).
Tolerance: float32 on CPU; the schedule is computed in float64 here and in float32 by diffusers, so the
final latents agree to about 1e-5 relative, and the 8-bit images to within one level.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megafusion.core.families import SD_SCHEDULER_CONFIG
from megafusion.core.plan import Stage, validate_plan
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

STEPS = 12
PROMPT = "a red fox in the snow"


def _diffusers_pipe(bundle):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    if bundle.family.is_xl:
        return StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet,
            scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl"])
def test_one_stage_equals_diffusers(name, request):
    bundle = request.getfixturevalue(name)
    fam = bundle.family
    plan = validate_plan(fam, [Stage(fam.native_height, fam.native_width, STEPS)])
    opts = GenerationOptions(PROMPT, guidance=7.0, seed=3, reschedule=False, dilation=1)
    ours = MegaFusionPipeline(bundle).generate(plan, opts)

    pipe = _diffusers_pipe(bundle)
    kw = dict(height=fam.native_height, width=fam.native_width, num_inference_steps=STEPS, guidance_scale=7.0)
    ref_latent = pipe(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    ref_image = pipe(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **kw).images[0]

    assert _relerr(ours.latent, ref_latent) < 1e-5
    ref_u8 = (ref_image * 255).round().astype(np.uint8)
    assert ours.image.shape == ref_u8.shape
    assert np.abs(ours.image.astype(int) - ref_u8.astype(int)).max() <= 1


def test_other_prompt_changes_latent(tiny_sd15):
    fam = tiny_sd15.family
    plan = validate_plan(fam, [Stage(fam.native_height, fam.native_width, 3)])
    pipe = MegaFusionPipeline(tiny_sd15)
    a = pipe.generate(plan, GenerationOptions("a cat", seed=1)).latent
    b = pipe.generate(plan, GenerationOptions("a dog", seed=1)).latent
    assert _relerr(a, b) > 1e-4
