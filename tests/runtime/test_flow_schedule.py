"""The flow schedule per stage against diffusers' FlowMatchEulerDiscreteScheduler, and the shift rule's meaning."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megafusion.core.dit_families import FLUX, SD3, TINY_FLUX
from megafusion.core.plan import Stage, default_plan, validate_plan
from megafusion.runtime.flow_schedule import base_sigmas, calculate_mu, plan_flow_schedule, shift_sigmas


def _scheduler(config, n=None, sigmas=None, mu=None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(**config)
    s.set_timesteps(n, sigmas=sigmas, mu=mu)
    return s.sigmas.double().numpy(), s.timesteps.double().numpy()


@pytest.mark.parametrize("family,size", [(SD3, 1024), (SD3, 1536), (FLUX, 1024), (FLUX, 2048)])
def test_one_stage_is_the_pipelines_schedule(family, size):
    n = 28
    plan = validate_plan(family, [Stage(size, size, n)])
    (st,) = plan_flow_schedule(plan, family)
    if family.kind == "flux":  # FluxPipeline: sigmas linspace(1, 1/N, N), mu from the token count
        ref, ts = _scheduler(family.scheduler, n, np.linspace(1, 1 / n, n), calculate_mu((size // 16) ** 2,
                                                                                        family.scheduler))
    else:  # StableDiffusion3Pipeline: the scheduler's own spacing and fixed shift
        ref, ts = _scheduler(family.scheduler, n)
    np.testing.assert_allclose(st.sigma_t, ref[:-1], rtol=1e-6)
    np.testing.assert_allclose(st.sigma_s, ref[1:], rtol=1e-6, atol=1e-7)
    sigma_t, _, timestep = st.tensors("cpu")
    np.testing.assert_allclose(timestep.double().numpy(), ts, rtol=1e-6)


@pytest.mark.parametrize("family", [SD3, FLUX])
def test_each_stage_is_the_scheduler_at_its_own_shift(family):
    """Stage k = the diffusers scheduler given that stage's slice of the global list and its own shift."""
    plan = default_plan(family)
    sched = plan_flow_schedule(plan, family)
    s = base_sigmas(plan.total_steps, family)
    for k, (st, rng) in enumerate(zip(sched, plan.step_ranges())):
        tokens = plan.stages[k].pixels // 256
        if family.kind == "flux":
            mu = calculate_mu(tokens, family.scheduler)
            assert st.shift == pytest.approx(math.exp(mu))
            ref, _ = _scheduler(family.scheduler, sigmas=s[rng.start:rng.stop], mu=mu)
        else:
            assert st.shift == pytest.approx(3.0 * math.sqrt(plan.gamma(k)))  # 3 at 1024, 6 at 2048
            ref, _ = _scheduler({**family.scheduler, "shift": st.shift}, sigmas=s[rng.start:rng.stop])
        np.testing.assert_allclose(st.sigma_t, ref[:-1], rtol=1e-6)
        last = k == len(sched) - 1
        np.testing.assert_allclose(st.sigma_s[:-1], ref[1:-1], rtol=1e-6)
        assert (st.sigma_s[-1] == 0) == last  # only the plan's last step ends at sigma 0
    # The relay re-noises to more noise than stage 1 would have had at that step: SNR divided by the shift^2.
    assert sched[1].sigma_t[0] > shift_sigmas(s[plan.stages[0].steps], sched[0].shift)


def test_shift_divides_the_snr_by_its_square():
    s = np.linspace(0.95, 0.05, 7)
    snr = ((1 - s) / s) ** 2
    s2 = shift_sigmas(s, 6.0)
    np.testing.assert_allclose(((1 - s2) / s2) ** 2, snr / 36, rtol=1e-12)


def test_no_reschedule_keeps_stage_one_shift():
    plan = default_plan(TINY_FLUX)
    a = [st.shift for st in plan_flow_schedule(plan, TINY_FLUX, reschedule=False)]
    b = [st.shift for st in plan_flow_schedule(plan, TINY_FLUX, reschedule=True)]
    assert a[0] == a[1] == b[0] and b[1] > b[0]


def test_unsupported_scheduler_options_refused():
    import dataclasses

    fam = dataclasses.replace(SD3, scheduler={**SD3.scheduler, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        plan_flow_schedule(default_plan(fam), fam)
