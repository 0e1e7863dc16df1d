"""Schedule and noise re-scheduling (docs/ALGORITHM.md §1, §4), checked against diffusers and float64 algebra."""
from __future__ import annotations

import numpy as np
import torch

from megafusion.core.families import SD15, SD_SCHEDULER_CONFIG, SDXL
from megafusion.core.plan import default_plan
from megafusion.runtime.schedule import alphas_cumprod, ddim_timesteps, plan_schedule


def test_timesteps_and_abar_match_diffusers():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    ref.set_timesteps(50)
    ts = ddim_timesteps(50, SD_SCHEDULER_CONFIG)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    # diffusers keeps abar in float32; ours is float64
    np.testing.assert_allclose(alphas_cumprod(SD_SCHEDULER_CONFIG), ref.alphas_cumprod.double().numpy(), rtol=2e-6)


def _snr(a):
    return a / (1 - a)


def test_stages_slice_one_global_list_and_snr_is_divided_by_gamma():
    for fam in (SD15, SDXL):
        plan = default_plan(fam)
        abar = alphas_cumprod(fam.scheduler)
        sched = plan_schedule(plan, fam.scheduler)
        all_ts = np.concatenate([s.timesteps for s in sched])
        np.testing.assert_array_equal(all_ts, ddim_timesteps(50, fam.scheduler))
        assert sched[0].gamma == 1.0
        for k, s in enumerate(sched):
            assert s.gamma == plan.gamma(k) if k else s.gamma == 1.0
            np.testing.assert_allclose(_snr(s.abar_t), _snr(abar[s.timesteps]) / s.gamma, rtol=1e-12)
        # the very last "previous" abar is abar[0] (set_alpha_to_one=False), re-scheduled by the last gamma
        g = sched[-1].gamma
        np.testing.assert_allclose(_snr(sched[-1].abar_s[-1]), _snr(abar[0]) / g, rtol=1e-12)
    assert [s.gamma for s in plan_schedule(default_plan(SD15), SD15.scheduler)] == [1.0, 2.25, 4.0]


def test_reschedule_off_is_plain_ddim():
    plan = default_plan(SDXL)
    abar = alphas_cumprod(SDXL.scheduler)
    for s in plan_schedule(plan, SDXL.scheduler, reschedule_noise=False):
        assert s.gamma == 1.0
        np.testing.assert_array_equal(s.abar_t, abar[s.timesteps])


def test_coefficients_on_device_tensors():
    s = plan_schedule(default_plan(SD15), SD15.scheduler)[1]
    c = s.coefficients("cpu")
    assert c.timesteps.dtype == torch.int64 and c.sqrt_abar_t.shape == (5,)
    torch.testing.assert_close(c.sqrt_abar_t ** 2 + c.sqrt_one_minus_abar_t ** 2, torch.ones(5))


def test_most_steps_the_schedule_allows():
    from megafusion.core.plan import PlanError, Stage, validate_plan

    plan = validate_plan(SDXL, [Stage(1024, 1024, 999)])
    (s,) = plan_schedule(plan, SDXL.scheduler)
    assert s.timesteps[0] == 999 and s.timesteps[-1] == 1
    import pytest

    with pytest.raises(PlanError, match="1000 steps in all; at most 999"):
        validate_plan(SDXL, [Stage(1024, 1024, 1000)])
