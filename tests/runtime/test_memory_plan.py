"""The memory plan (runtime/memory_plan.py): the VAE is tiled only when the untiled estimate exceeds the budget
and tiling lowers it; forced on or off on request; the chosen estimate is the one that runs."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.families import SDXL
from megafusion.core.memory import GiB
from megafusion.core.plan import Stage, validate_plan
from megafusion.runtime.memory_plan import plan_memory
from megafusion.runtime.vae_tiling import VaeTiling

PLAN = validate_plan(SDXL, [Stage(1024, 1024, 1), Stage(2048, 2048, 1)])


@pytest.fixture(scope="module")
def untiled_and_tiled():
    big = plan_memory(SDXL, PLAN, torch.float16, torch.bfloat16, 100 * GiB, tiling=VaeTiling(1024))
    forced = plan_memory(SDXL, PLAN, torch.float16, torch.bfloat16, 100 * GiB, when="on", tiling=VaeTiling(1024))
    return big, forced


@pytest.mark.slow
def test_tiling_is_chosen_only_when_the_untiled_plan_does_not_fit(untiled_and_tiled):
    big, forced = untiled_and_tiled
    assert big.tiling is None and big.fits and "fits the budget" in big.describe()[-1]
    assert forced.tiling == VaeTiling(1024) and "final decode 2048x2048 (tiled 1024)" in dict(forced.estimate.segments)
    # SDXL's VAE at 2048 in 1024-pixel tiles: the decode's transient drops from 6.0 to about 5.0 GiB (bf16)
    assert forced.estimate.peak_bytes < big.estimate.peak_bytes - 0.5 * GiB
    between = (forced.estimate.peak_bytes + big.estimate.peak_bytes) // 2
    chosen = plan_memory(SDXL, PLAN, torch.float16, torch.bfloat16, between, tiling=VaeTiling(1024))
    assert chosen.tiling == VaeTiling(1024) and chosen.fits
    assert chosen.estimate.peak_bytes == forced.estimate.peak_bytes and chosen.untiled_peak_bytes == big.estimate.peak_bytes
    too_small = plan_memory(SDXL, PLAN, torch.float16, torch.bfloat16, 8 * GiB, tiling=VaeTiling(1024))
    assert too_small.tiling is not None and not too_small.fits
    off = plan_memory(SDXL, PLAN, torch.float16, torch.bfloat16, 8 * GiB, when="off")
    assert off.tiling is None and not off.fits


def test_unknown_choice_is_named():
    with pytest.raises(ValueError, match="'sometimes'"):
        plan_memory(SDXL, PLAN, torch.float16, torch.bfloat16, GiB, when="sometimes")


def test_parking_is_chosen_when_the_tiled_plan_does_not_fit_and_refused_below_it():
    """tiny-sdxl at 384x256 in 128-pixel tiles: untiled about 18 MB, tiled 25 MB (the halos of such small tiles
    cost more than they save), parked 11 MB with 19 MB of host memory."""
    from megafusion.core.families import TINY_SDXL

    plan = validate_plan(TINY_SDXL, [Stage(128, 128, 1), Stage(256, 384, 1)])
    tiling = VaeTiling(128)
    chosen = plan_memory(TINY_SDXL, plan, torch.float32, torch.float32, 14 * 10**6, tiling=tiling)
    assert chosen.tiling == VaeTiling(128, park=True) and chosen.fits
    assert chosen.estimate.peak_bytes < 12 * 10**6 < 17 * 10**6 < chosen.untiled_peak_bytes
    assert chosen.estimate.host_bytes > 15 * 10**6  # two 32-channel 384x256 maps and their halos, fp32
    assert "final decode 384x256 (tiled 128, parked)" in dict(chosen.estimate.segments)
    said = chosen.describe()
    assert "host memory for parked VAE tiles" in said[-2] and "parked in host memory" in said[-1]
    assert "the untiled and tiled estimates" in said[-1]
    refused = plan_memory(TINY_SDXL, plan, torch.float32, torch.float32, 8 * 10**6, tiling=tiling)
    assert refused.tiling == chosen.tiling and not refused.fits  # the lowest estimate, named when refused
    assert refused.estimate.peak_bytes == chosen.estimate.peak_bytes
