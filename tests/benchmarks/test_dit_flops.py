"""Cost of the transformer families on the meta device: the conventions, the attention count, the paper's rows."""
from __future__ import annotations

import pytest

from megafusion.benchmarks.dit_flops import (PAPER_SD3_GMACS, DiTCostCounter, dit_plan_cost, pixel_step_ratio)
from megafusion.core.dit_families import SD3, TINY_FLUX, TINY_SD3
from megafusion.core.plan import Stage, default_plan, validate_plan


@pytest.fixture(scope="module")
def sd3():
    return DiTCostCounter(TINY_SD3)


def test_sd3_attention_is_the_joint_attention_formula(sd3):
    """Joint attention over image + text tokens: QK^T and AV, 2 L^2 d MACs per layer and sample, 2 FLOPs each."""
    cfg = TINY_SD3.transformer
    for size, batch in ((128, 1), (256, 2)):
        tokens = (size // 16) ** 2 + sd3.text_tokens
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        expected = cfg["num_layers"] * batch * 2 * 2 * tokens**2 * inner
        assert sd3.transformer(size, size, batch).attention_flops == expected


def test_conventions(sd3):
    one, two = sd3.transformer(128, 128, 1), sd3.transformer(128, 128, 2)
    assert two.macs == 2 * one.macs and two.flops == 2 * one.flops  # the CFG batch doubles everything
    assert one.flops >= 2 * one.macs + one.attention_flops  # 2 per MAC, attention and the rest besides
    plan = default_plan(TINY_SD3)
    direct = validate_plan(TINY_SD3, [Stage(256, 256, plan.total_steps)])
    mf, d = dit_plan_cost(sd3, plan), dit_plan_cost(sd3, direct)
    assert mf.paper_gmacs < d.paper_gmacs and mf.true_tflop < d.true_tflop
    latent = dit_plan_cost(sd3, plan, relay="latent")
    assert [s.true_tflop for s in latent.segments if s.kind == "relay"] == [0.0]
    assert mf.true_tflop > latent.true_tflop  # the pixel relay's decode and encode are counted


def test_flux_is_one_pass_whatever_the_guidance():
    c = DiTCostCounter(TINY_FLUX)
    plan = default_plan(TINY_FLUX)
    assert dit_plan_cost(c, plan, cfg=True).paper_gmacs == dit_plan_cost(c, plan, cfg=False).paper_gmacs
    assert not dit_plan_cost(c, plan, cfg=True).cfg


def test_paper_sd3_rows_are_pixel_scaled():
    plan = default_plan(SD3)
    direct = validate_plan(SD3, [Stage(2048, 2048, 28)])
    paper = PAPER_SD3_GMACS["sd3 2048 megafusion"] / PAPER_SD3_GMACS["sd3 2048 direct"]
    assert pixel_step_ratio(plan, direct) == pytest.approx(paper, abs=2e-4)  # 0.4643 against 0.4642
