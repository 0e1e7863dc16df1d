"""Image to image (docs/ALGORITHM.md §14): one stage is diffusers' img2img pipeline with DDIM; several stages
skip what the strength or the start stage leaves out.

Reference: diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionXLImg2ImgPipeline fed the same modules and
the photo's latent c * mean(E(photo)) (diffusers samples the posterior for a pixel image; a 4-channel input it takes
as the latent as is), so both start from the same latent and draw the same noise. Tolerance: float32 on CPU,
schedules in float64 here and float32 in diffusers: 1e-5 relative on the final latent.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.families import SD_SCHEDULER_CONFIG
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.img2img import ImageInputError, ImageStart, encode_image, entry_point, read_image
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from tests.helpers import photo as _photo, relerr as _relerr

PROMPT = "a lighthouse at dusk"


def _img2img_pipe(bundle):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    sched = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    if bundle.family.is_xl:
        return StableDiffusionXLImg2ImgPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet, scheduler=sched,
            force_zeros_for_empty_prompt=True, add_watermarker=False, requires_aesthetics_score=False)
    return StableDiffusionImg2ImgPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl"])
@pytest.mark.parametrize("strength", [0.6, 1.0])  # 3 and 5 of 5 steps
def test_one_stage_equals_diffusers_img2img(name, strength, request):
    bundle = request.getfixturevalue(name)
    fam = bundle.family
    h, w, steps = fam.native_height, fam.native_width, 5
    plan = validate_plan(fam, [Stage(h, w, steps)])
    photo = _photo(h, w)
    opts = GenerationOptions(PROMPT, guidance=6.0, seed=5, reschedule=False, dilation=1)
    ours = MegaFusionPipeline(bundle).generate(plan, opts, image=ImageStart(photo, strength))

    nets = TorchNetworks(bundle)
    latent = encode_image(nets, photo, h, w, float(bundle.vae.config.scaling_factor), "cpu")
    ref = _img2img_pipe(bundle)(PROMPT, image=latent, strength=strength, num_inference_steps=steps,
                                guidance_scale=6.0, generator=torch.Generator().manual_seed(5),
                                output_type="latent").images
    assert _relerr(ours.latent, ref) < 1e-5


def test_photo_encoding_is_the_vae_posterior_mean(tiny_sd15):
    photo = _photo(128, 128, seed=1)
    c = float(tiny_sd15.vae.config.scaling_factor)
    ours = encode_image(TorchNetworks(tiny_sd15), photo, 128, 128, c, "cpu")
    with torch.inference_mode():
        ref = tiny_sd15.vae.encode(photo).latent_dist.mean * c
    assert _relerr(ours, ref) < 1e-6


def test_start_stage_skips_earlier_stages(tiny_sdxl):
    """Entering a 2-stage plan at stage 2 with re-scheduling and dilation off runs stage 2's timesteps at stage 2's
    size: a one-stage plan at that size whose strength selects the same last 2 of 6 steps."""
    fam = tiny_sdxl.family
    photo = _photo(200, 180)  # any size: resized to the entry stage's
    opts = GenerationOptions(PROMPT, seed=2, reschedule=False, dilation=1)
    pipe = MegaFusionPipeline(tiny_sdxl)
    two = validate_plan(fam, [Stage(128, 128, 4), Stage(256, 256, 2)])
    one = validate_plan(fam, [Stage(256, 256, 6)])
    a = pipe.generate(two, opts, image=ImageStart(photo, start_stage=2))
    b = pipe.generate(one, opts, image=ImageStart(photo, 0.34))  # int(6 * 0.34) = 2
    assert [name for name, _ in a.timings][:3] == ["text encoders", "encode image", "stage 2 (256x256, 2 steps)"]
    assert _relerr(a.latent, b.latent) < 1e-6
    # With re-scheduling on, stage 2 noises and denoises with gamma 4: a different latent.
    c = pipe.generate(two, GenerationOptions(PROMPT, seed=2, dilation=1), image=ImageStart(photo, start_stage=2))
    assert _relerr(c.latent, a.latent) > 1e-3


def test_graphed_loop_matches_eager(tiny_sd15):
    fam = tiny_sd15.family
    plan = validate_plan(fam, [Stage(128, 128, 3), Stage(192, 192, 1), Stage(256, 256, 1)])
    start = ImageStart(_photo(128, 128), 0.5)  # int(5 * 0.5) = 2 steps run: enters stage 2
    opts = GenerationOptions(PROMPT, seed=4)
    eager = MegaFusionPipeline(tiny_sd15).generate(plan, opts, image=start)
    fast = MegaFusionPipeline.fast(tiny_sd15, device="cpu").generate(plan, opts, image=start)
    assert _relerr(fast.latent, eager.latent) < 1e-6
    assert eager.image.shape == (256, 256, 3)


PLAN_STEPS = [(128, 40), (192, 5), (256, 5)]


@pytest.mark.parametrize("strength,start,expect", [
    (1.0, None, (0, 0, 0)),
    (0.8, None, (0, 10, 10)),
    (0.2, None, (1, 0, 40)),    # int(50 * 0.2) = 10 steps: all of stages 2 and 3
    (0.1, None, (2, 0, 45)),
    (0.02, None, (2, 4, 49)),   # one step
    (None, None, (0, 10, 10)),  # diffusers' default 0.8
    (None, 2, (1, 0, 40)),      # the start stage's first step
    (None, 3, (2, 0, 45)),
    (0.16, 2, (1, 2, 42)),
])
def test_entry_point(tiny_sd15, strength, start, expect):
    plan = validate_plan(tiny_sd15.family, [Stage(s, s, n) for s, n in PLAN_STEPS])
    e = entry_point(plan, strength, start)
    assert (e.stage, e.step, e.global_step) == expect


@pytest.mark.parametrize("strength,start,needle", [
    (0.0, None, "--strength 0.0: must be a number in (0, 1]"),
    (1.5, None, "--strength 1.5: must be a number in (0, 1]"),
    (float("nan"), None, "--strength nan: must be a number in (0, 1]"),
    (0.01, None, "runs int(50 * 0.01) = 0 of the plan's 50 steps; give at least 0.02"),
    (None, 4, "--start-stage 4: the plan has stages 1 to 3"),
    (None, 0, "--start-stage 0: the plan has stages 1 to 3"),
    (0.5, 2, "--strength 0.5 starts at step 26 of 50, in stage 1, not --start-stage 2; "
             "stage 2 takes strengths 0.12 to 0.2"),
])
def test_entry_point_refusals(tiny_sd15, strength, start, needle):
    plan = validate_plan(tiny_sd15.family, [Stage(s, s, n) for s, n in PLAN_STEPS])
    with pytest.raises(ImageInputError) as e:
        entry_point(plan, strength, start)
    assert needle in str(e.value)


def test_read_image(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (6, 4), (255, 0, 128, 10))
    rgba.save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png")
    assert x.shape == (1, 3, 4, 6)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match="not a readable image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ImageInputError, match="no such file"):
        read_image(tmp_path / "missing.png")


@pytest.mark.gpu
def test_graphed_img2img_on_cuda_matches_eager():
    """On CUDA a photo entering part-way through a stage runs that stage's remaining steps as graph replays."""
    from megafusion.core.loading import load_model

    bundle = load_model("tiny-sdxl", device="cuda", dtype=torch.float32)
    plan = validate_plan(bundle.family, [Stage(128, 128, 6), Stage(256, 256, 2)])
    start = ImageStart(_photo(128, 128), 0.5)  # 4 of 8 steps: the last 2 of stage 1, then stage 2
    opts = GenerationOptions(PROMPT, seed=6)
    eager = MegaFusionPipeline(bundle).generate(plan, opts, image=start)
    fast = MegaFusionPipeline.fast(bundle)
    got = fast.generate(plan, opts, image=start)
    assert fast.graphs.replays == 4
    assert _relerr(got.latent, eager.latent) < 1e-3
