"""The stage loop: truncation x0 from the pre-update latent (float64 check), dilation per stage, seeding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megafusion.engine.networks import TorchNetworks
from megafusion.core.plan import Stage, default_plan, validate_plan
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from megafusion.runtime.schedule import plan_schedule


class Spy(TorchNetworks):
    """Records every UNet call and what the relay decodes."""

    def __init__(self, bundle):
        super().__init__(bundle)
        self.calls, self.decoded = [], []

    def unet(self, sample, timestep, ehs, te, tid, dilation):
        out = super().unet(sample, timestep, ehs, te, tid, dilation)
        self.calls.append((sample.clone(), int(timestep), dilation, out.clone(), sample.shape[-2:]))
        return out

    def vae_decode(self, latents):
        self.decoded.append(latents.clone())
        return super().vae_decode(latents)


W = 7.0


def _plan(fam):
    return validate_plan(fam, [Stage(128, 128, 4), Stage(192, 192, 2), Stage(256, 256, 2)])


def test_truncation_uses_pre_update_latent(tiny_sd15):
    fam = tiny_sd15.family
    plan = _plan(fam)
    spy = Spy(tiny_sd15)
    MegaFusionPipeline(tiny_sd15, spy).generate(plan, GenerationOptions("a fox", guidance=W, seed=0))
    sched = plan_schedule(plan, fam.scheduler)
    scaling = tiny_sd15.vae.config.scaling_factor
    stage_end = np.cumsum([s.steps for s in plan.stages])
    for k in range(2):  # both relays
        sample, t, _, out, _ = spy.calls[stage_end[k] - 1]
        assert t == sched[k].timesteps[-1]
        z = sample[:1].double()
        eu, ec = out.double().chunk(2)
        eps = eu + W * (ec - eu)
        a = sched[k].abar_t[-1]
        x0_ref = (z - np.sqrt(1 - a) * eps) / np.sqrt(a)  # paper Eq. 2, pre-update latent
        x0_used = spy.decoded[k].double() * scaling
        err = float((x0_used - x0_ref).norm() / x0_ref.norm())
        assert err < 1e-6
        # the authors' variant (x0 of the *updated* latent) is measurably different
        z_upd = np.sqrt(sched[k].abar_s[-1]) * x0_ref + np.sqrt(1 - sched[k].abar_s[-1]) * eps
        x0_wrong = (z_upd - np.sqrt(1 - a) * eps) / np.sqrt(a)
        assert float((x0_used - x0_wrong).norm() / x0_ref.norm()) > 1e-3


@pytest.mark.parametrize("dilation", [2, 1])
def test_dilation_never_at_stage_one(tiny_sdxl, dilation):
    fam = tiny_sdxl.family
    plan = validate_plan(fam, [Stage(128, 128, 3), Stage(256, 256, 2)])
    spy = Spy(tiny_sdxl)
    MegaFusionPipeline(tiny_sdxl, spy).generate(plan, GenerationOptions("x", seed=0, dilation=dilation))
    assert [c[2] for c in spy.calls] == [1, 1, 1, dilation, dilation]
    assert [tuple(c[4]) for c in spy.calls] == [(16, 16)] * 3 + [(32, 32)] * 2


def test_same_seed_same_bytes_other_seed_other_image(tiny_sdxl):
    pipe = MegaFusionPipeline(tiny_sdxl)
    plan = validate_plan(tiny_sdxl.family, [Stage(128, 128, 3), Stage(192, 256, 2)])
    a = pipe.generate(plan, GenerationOptions("a fox", seed=5)).image
    b = pipe.generate(plan, GenerationOptions("a fox", seed=5)).image
    c = pipe.generate(plan, GenerationOptions("a fox", seed=6)).image
    assert a.tobytes() == b.tobytes()
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


@pytest.mark.parametrize("w,h", [(256, 256), (448, 256), (256, 192), (128, 512), (448, 192)])
def test_output_is_exactly_the_requested_size(tiny_sdxl, w, h):
    """1:1, 16:9 (~), 4:3, 1:4 and 21:9."""
    plan = default_plan(tiny_sdxl.family, w, h, total_steps=4)
    img = MegaFusionPipeline(tiny_sdxl).generate(plan, GenerationOptions("x", seed=0)).image
    assert img.shape == (h, w, 3) and img.dtype == np.uint8


def test_latent_relay_runs_and_differs_from_pixel_relay(tiny_sd15):
    plan = validate_plan(tiny_sd15.family, [Stage(128, 128, 3), Stage(256, 256, 2)])
    pipe = MegaFusionPipeline(tiny_sd15)
    px = pipe.generate(plan, GenerationOptions("x", seed=0, relay="pixel")).latent
    lt = pipe.generate(plan, GenerationOptions("x", seed=0, relay="latent")).latent
    assert px.shape == lt.shape == (1, 4, 32, 32)
    assert float((px - lt).norm() / px.norm()) > 1e-3


def test_initial_latent_is_diffusers_draw(tiny_sd15):
    """Stage 1's first UNet input is diffusers' randn_tensor draw for the seed (CPU generator)."""
    from diffusers.utils.torch_utils import randn_tensor

    spy = Spy(tiny_sd15)
    plan = validate_plan(tiny_sd15.family, [Stage(128, 128, 1)])
    MegaFusionPipeline(tiny_sd15, spy).generate(plan, GenerationOptions("x", seed=11))
    ref = randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    assert torch.equal(spy.calls[0][0][:1], ref)
