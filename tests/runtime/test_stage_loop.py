"""The stage loop: truncation x0 from the pre-update latent (float64 check), dilation per stage, seeding, what
the UNet is given at each stage (SDXL time ids, the re-noised relay latent) and the output crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megafusion.engine.networks import TorchNetworks
from megafusion.core.plan import Stage, default_plan, validate_plan
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from megafusion.runtime.schedule import plan_schedule


class Spy(TorchNetworks):
    """Records every UNet call (and its SDXL time ids), what the VAE decodes and what the relay encodes."""

    def __init__(self, bundle):
        super().__init__(bundle)
        self.calls, self.time_ids, self.decoded, self.encoded = [], [], [], []

    def unet(self, sample, timestep, ehs, te, tid, dilation):
        out = super().unet(sample, timestep, ehs, te, tid, dilation)
        self.calls.append((sample.clone(), int(timestep), dilation, out.clone(), sample.shape[-2:]))
        self.time_ids.append(None if tid is None else tid.clone())
        return out

    def vae_decode(self, latents):
        self.decoded.append(latents.clone())
        return super().vae_decode(latents)

    def vae_encode(self, images):
        out = super().vae_encode(images)
        self.encoded.append(out.clone())
        return out


LOOPS = ["eager", "buffered"]
"""The eager stage loop, and the buffered graph step run eagerly (what CUDA captures, here on the CPU)."""


def _pipeline(bundle, nets, loop):
    if loop == "eager":
        return MegaFusionPipeline(bundle, nets)
    return MegaFusionPipeline.fast(bundle, nets, device="cpu")


def _relerr(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


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


# --- what each stage's UNet is given, and the output crop (docs/ALGORITHM.md §3, §9, §10) -------------------

def _first_calls(plan):
    """Index of each stage's first UNet call in the recorded list."""
    return [r.start for r in plan.step_ranges()]


@pytest.mark.parametrize("loop", LOOPS)
def test_sdxl_time_ids_are_each_stages_own_size(tiny_sdxl, loop):
    """Every UNet call of stage k gets (H_k, W_k, 0, 0, H_k, W_k) in both CFG halves: not the last stage's size,
    and not the output's at the rounded-up last stage (251x230 runs at 256x256)."""
    fam = tiny_sdxl.family
    plan = validate_plan(fam, [Stage(128, 128, 2), Stage(160, 224, 1), Stage(256, 256, 2)], 251, 230)
    spy = Spy(tiny_sdxl)
    _pipeline(tiny_sdxl, spy, loop).generate(plan, GenerationOptions("a fox", guidance=W, seed=0))
    assert len(spy.time_ids) == plan.total_steps
    for stage, rng in zip(plan.stages, plan.step_ranges()):
        row = [stage.height, stage.width, 0, 0, stage.height, stage.width]
        expected = torch.tensor([row, row], dtype=torch.float32)  # [uncond, cond]
        for i in rng:
            assert torch.equal(spy.time_ids[i], expected), (i, spy.time_ids[i], row)


@pytest.mark.parametrize("loop", LOOPS)
def test_relay_renoises_with_the_next_stages_rescheduled_abar(tiny_sd15, loop):
    """Stage k+1's first UNet input is sqrt(abar'_t') x0_up + sqrt(1 - abar'_t') n, with abar' re-scheduled by
    gamma_{k+1}, x0_up what the relay encoded and n the seed's draw for that relay; float64 reference."""
    fam = tiny_sd15.family
    plan = validate_plan(fam, [Stage(128, 128, 2), Stage(192, 192, 1), Stage(256, 256, 2)])  # gamma 2.25, 4
    seed = 4
    spy = Spy(tiny_sd15)
    _pipeline(tiny_sd15, spy, loop).generate(plan, GenerationOptions("a fox", guidance=W, seed=seed))

    # The schedule of §1 in float64: N = 5 steps, r = 200, t = 801, 601, 401, 201, 1.
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    ts = [(plan.total_steps - 1 - i) * (1000 // plan.total_steps) + 1 for i in range(plan.total_steps)]
    # The noise stream of §9: the initial latent, then one draw per relay, all from one CPU generator.
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn((1, 4, s.height // 8, s.width // 8), generator=g) for s in plan.stages]
    scaling = tiny_sd15.vae.config.scaling_factor
    assert len(spy.encoded) == 2
    for k, first in enumerate(_first_calls(plan)[1:], 1):
        sample, t, *_ = spy.calls[first]
        assert t == ts[first]
        assert torch.equal(sample[:1], sample[1:])  # CFG batch [z, z]
        gamma = plan.stages[k].pixels / plan.stages[0].pixels
        ab = abar[t] / (gamma - (gamma - 1.0) * abar[t])
        x0_up = spy.encoded[k - 1].double() * scaling
        noise = draws[k].double()
        ref = np.sqrt(ab) * x0_up + np.sqrt(1.0 - ab) * noise
        assert _relerr(sample[:1], ref) < 1e-6, k
        # the un-rescheduled level (abar_t' instead of abar'_t') is far away
        plain = np.sqrt(abar[t]) * x0_up + np.sqrt(1.0 - abar[t]) * noise
        assert _relerr(plain, ref) > 1e-2


@pytest.mark.parametrize("loop", LOOPS)
def test_output_is_the_centre_crop_of_the_last_stage(tiny_sdxl, loop):
    """251x230 from a 256x256 last stage: rows 13..242 and columns 2..252 of the decoded image (the odd extra
    column comes off the right), rounded as §10 says; float64 reference from the final latent."""
    fam = tiny_sdxl.family
    plan = validate_plan(fam, [Stage(128, 128, 2), Stage(256, 256, 2)], 251, 230)
    spy = Spy(tiny_sdxl)
    res = _pipeline(tiny_sdxl, spy, loop).generate(plan, GenerationOptions("a fox", guidance=W, seed=1))
    scaling = tiny_sdxl.vae.config.scaling_factor
    with torch.no_grad():
        full = tiny_sdxl.vae.decode(res.latent / scaling, return_dict=False)[0][0].double()
    assert torch.equal(spy.decoded[-1], res.latent / scaling)  # the output decode is of the final latent
    u8 = torch.round(torch.clamp(full / 2 + 0.5, 0, 1) * 255).permute(1, 2, 0).numpy()
    assert u8.shape == (256, 256, 3)
    top, left = (256 - 230) // 2, (256 - 251) // 2
    assert (top, left) == (13, 2)
    img = res.image.astype(np.float64)
    assert img.shape == (230, 251, 3)
    assert np.abs(img - u8[top:top + 230, left:left + 251]).max() <= 1  # float32 vs float64 rounding
    # the reference tells crops apart: top-left, or one row / column off, is far from it
    for dy, dx in ((0, 0), (top + 1, left), (top, left + 1)):
        assert np.abs(u8[dy:dy + 230, dx:dx + 251] - u8[top:top + 230, left:left + 251]).mean() > 1.0
