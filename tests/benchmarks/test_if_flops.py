"""Cost of the IF cascade in the paper's convention (benchmarks/flops.py IFCostCounter, meta device)."""
from __future__ import annotations

import pytest

from megafusion.benchmarks.flops import PAPER_TABLE1_IF_GMACS, IFCostCounter
from megafusion.core.if_family import IF, TINY_IF
from megafusion.core.plan import Stage
from megafusion.runtime.pixel_pipeline import pixel_plan


def test_plan_cost_is_the_sum_of_its_steps():
    c = IFCostCounter(TINY_IF)
    plan = pixel_plan(TINY_IF, 2, [Stage(64, 64, 3), Stage(128, 128, 2)])
    total = c.plan(2, plan)
    assert total.macs == 3 * c.unet(2, 64, 64).macs + 2 * c.unet(2, 128, 128, dilation=2).macs
    assert c.unet(2, 128, 128, dilation=2).macs == c.unet(2, 128, 128).macs  # dilation moves taps, not MACs
    assert c.plan(2, plan, cfg=False).macs * 2 == total.macs  # CFG is batch 2
    ratio = c.unet(1, 32, 32).macs / c.unet(1, 16, 16).macs
    assert 3.8 < ratio <= 4.0  # conv/linear MACs grow with pixels (text projections do not)


@pytest.mark.slow
def test_paper_floyd_rows_are_a_tenth_of_ours():
    c = IFCostCounter(IF)
    ours = {
        "if stage I 128 direct": c.plan(1, pixel_plan(IF, 1, [Stage(128, 128, 100)])).macs / 1e9,
        "if stage I 128 megafusion": c.plan(1, pixel_plan(IF, 1)).macs / 1e9,
        "if stage II 512 direct": c.plan(2, pixel_plan(IF, 2, [Stage(512, 512, 50)])).macs / 1e9,
        "if stage II 512 megafusion": c.plan(2, pixel_plan(IF, 2)).macs / 1e9,
    }
    for key, paper in PAPER_TABLE1_IF_GMACS.items():
        assert abs(ours[key] / paper / 10 - 1) < 0.004, (key, ours[key], paper)  # 9.97 .. 10.01 measured
    for stage in ("I 128", "II 512"):
        mf = ours[f"if stage {stage} megafusion"] / ours[f"if stage {stage} direct"]
        paper = PAPER_TABLE1_IF_GMACS[f"if stage {stage} megafusion"] / PAPER_TABLE1_IF_GMACS[f"if stage {stage} direct"]
        assert abs(mf / paper - 1) < 0.002 and abs(mf - 0.4) < 0.003  # about 40% of direct, as the paper says
