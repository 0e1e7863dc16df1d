"""Pixel truncate and relay (docs/ALGORITHM.md §20) against a reference built from diffusers' own DDPMScheduler
step, with the re-scheduled abar' written into the scheduler (tiny-if, CPU, float32; tolerance 1e-5 relative)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megafusion.core.dilation import mid_dilation
from megafusion.core.if_family import IF, TINY_IF
from megafusion.core.if_loading import build_random_if
from megafusion.core.plan import PlanError, Stage
from megafusion.runtime.pixel_pipeline import IFMegaFusionPipeline, PixelOptions, pixel_plan

REL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundle():
    return build_random_if(TINY_IF, seed=3)


def reference(unet, cfg, stages, states, w, seed, dilation, low_res=None, fam=TINY_IF):
    """MegaFusion written out with diffusers' DDPMScheduler: stage k's scheduler gets abar' (gamma_k = pixel
    ratio); the last step of a non-final stage is run only for its x0 (its variance draw goes to a throwaway
    generator, as the runtime draws nothing there); relay = clamp, bicubic, clamp; re-noise with add_noise at
    the next stage's first timestep."""
    from diffusers import DDPMScheduler

    gen = torch.Generator().manual_seed(seed)
    total = sum(s[2] for s in stages)
    ts = DDPMScheduler(**cfg)
    ts.set_timesteps(total)
    timesteps = ts.timesteps
    noising = DDPMScheduler(**fam.noising_scheduler)
    start, x0 = 0, None
    for k, (h, wd, n) in enumerate(stages):
        sch = DDPMScheduler(**cfg)
        sch.set_timesteps(total)
        gamma = h * wd / (stages[0][0] * stages[0][1])
        ac = sch.alphas_cumprod.double()
        sch.alphas_cumprod = (ac / (gamma - (gamma - 1) * ac)).float()
        mine = timesteps[start:start + n]
        if k == 0:
            x = torch.randn((1, 3, h, wd), generator=gen)
        else:
            up = F.interpolate(x0.clamp(-1, 1), (h, wd), mode="bicubic", align_corners=False).clamp(-1, 1)
            x = sch.add_noise(up, torch.randn((1, 3, h, wd), generator=gen), mine[:1])
        cond = labels = None
        if low_res is not None:
            up = F.interpolate(low_res, (h, wd), mode="bilinear", align_corners=True)
            cond = noising.add_noise(up, torch.randn((1, 3, h, wd), generator=gen), torch.tensor([fam.noise_level]))
            labels = torch.tensor([fam.noise_level] * 2)
        with mid_dilation(unet, 1 if k == 0 else dilation):
            for i, t in enumerate(mine):
                inp = x if cond is None else torch.cat([x, cond], dim=1)
                out = unet(torch.cat([inp, inp]), t, encoder_hidden_states=states, class_labels=labels).sample
                (eu, _), (ec, v) = (o.split(3, dim=1) for o in out.chunk(2))
                pred = torch.cat([eu + w * (ec - eu), v], dim=1)
                last = k < len(stages) - 1 and i == n - 1
                g = torch.Generator().manual_seed(0) if last else gen
                prev, x0 = sch.step(pred, t, x, generator=g, return_dict=False)
                if not last:
                    x = prev
        start += n
    return x


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_stage_one_megafusion_matches_reference(bundle):
    stages = ((16, 16, 6), (32, 32, 4))
    pipe = IFMegaFusionPipeline(bundle)
    opts = PixelOptions("a red cube", seed=2)
    states = pipe.encode(opts.prompt, "", cfg=True)
    ours = pipe.run_cascade(1, pixel_plan(TINY_IF, 1, stages), states, 7.0, opts, torch.Generator().manual_seed(2))
    ref = reference(bundle.unet_1, TINY_IF.scheduler_1, stages, states, 7.0, 2, dilation=2)
    assert ours.shape == (1, 3, 32, 32)
    assert _rel(ours, ref) < REL
    undilated = reference(bundle.unet_1, TINY_IF.scheduler_1, stages, states, 7.0, 2, dilation=1)
    assert _rel(undilated, ref) > 1e-3  # the dilation is what the match depends on


@torch.no_grad()
def test_stage_two_megafusion_matches_reference(bundle):
    stages = ((64, 64, 4), (128, 128, 2))
    low = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pipe = IFMegaFusionPipeline(bundle)
    opts = PixelOptions("a lighthouse", seed=4)
    states = pipe.encode(opts.prompt, "", cfg=True)
    ours = pipe.run_cascade(2, pixel_plan(TINY_IF, 2, stages), states, 4.0, opts, torch.Generator().manual_seed(4),
                            low_res=low)
    ref = reference(bundle.unet_2, TINY_IF.scheduler_2, stages, states, 4.0, 4, dilation=2, low_res=low)
    assert ours.shape == (1, 3, 128, 128)
    assert _rel(ours, ref) < REL


@torch.no_grad()
def test_reschedule_and_dilation_change_the_image(bundle):
    pipe = IFMegaFusionPipeline(bundle)
    plan = pixel_plan(TINY_IF, 1, [Stage(16, 16, 4), Stage(32, 32, 2)])
    base = pipe.generate(plan, None, PixelOptions("a fox", seed=1)).sample_1
    same = pipe.generate(plan, None, PixelOptions("a fox", seed=1)).sample_1
    assert torch.equal(base, same)  # one seed, one image
    for opts in (PixelOptions("a fox", seed=1, reschedule=False), PixelOptions("a fox", seed=1, dilation=1),
                 PixelOptions("a fox", seed=2)):
        assert _rel(pipe.generate(plan, None, opts).sample_1, base) > 1e-3, opts


@torch.no_grad()
def test_whole_cascade_gives_the_last_stage_image(bundle):
    plan_1 = pixel_plan(TINY_IF, 1, [Stage(16, 16, 3), Stage(32, 32, 2)])
    plan_2 = pixel_plan(TINY_IF, 2, [Stage(64, 64, 2), Stage(128, 128, 1)])
    res = IFMegaFusionPipeline(bundle).generate(plan_1, plan_2, PixelOptions("a boat", seed=0))
    assert res.image.shape == (128, 128, 3) and res.image.dtype == np.uint8
    assert res.sample_1.shape == (1, 3, 32, 32) and res.sample_2.shape == (1, 3, 128, 128)
    assert len(res.timings) == 1 + 2 + 2  # text encoder, two stages per cascade stage
    assert res.image.std() > 1.0  # not a flat image


def test_default_plans_are_the_papers():
    for fam, p1, p2 in ((IF, (64, 128), (256, 512)), (TINY_IF, (16, 32), (64, 128))):
        a, b = pixel_plan(fam, 1), pixel_plan(fam, 2)
        assert [s.height for s in a.stages] == list(p1) and [s.steps for s in a.stages] == [80, 20]
        assert [s.height for s in b.stages] == list(p2) and [s.steps for s in b.stages] == [40, 10]
        assert a.gamma(1) == b.gamma(1) == 4.0  # the paper's gamma for 2x per side


@pytest.mark.parametrize("stages, match", [
    ([Stage(18, 16, 5)], "multiples of 4"),
    ([Stage(32, 32, 5), Stage(16, 16, 5)], "smaller than the stage before"),
    ([Stage(16, 16, 0)], "steps must be >= 1"),
    ([], "at least one stage"),
])
def test_bad_plans_name_the_bad_stage(stages, match):
    with pytest.raises(PlanError, match=match):
        pixel_plan(TINY_IF, 1, stages)


def test_bad_options_name_the_bad_value():
    with pytest.raises(ValueError, match="guidance_2 must be a finite number"):
        PixelOptions("x", guidance_2=float("nan"))
    with pytest.raises(ValueError, match="dilation must be between 1 and 8, got 0"):
        PixelOptions("x", dilation=0)
