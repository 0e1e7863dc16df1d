"""Stage plans (docs/ALGORITHM.md §2): defaults, any aspect ratio, validation with messages naming the value."""
from __future__ import annotations

import pytest

from megafusion.core.families import SD15, SDXL, TINY_SDXL
from megafusion.core.plan import PlanError, Stage, default_plan, parse_size, parse_stages, validate_plan


def _sizes(plan):
    return [(s.width, s.height, s.steps) for s in plan.stages]


def test_paper_defaults():
    assert _sizes(default_plan(SD15)) == [(512, 512, 40), (768, 768, 5), (1024, 1024, 5)]
    assert _sizes(default_plan(SDXL)) == [(1024, 1024, 40), (2048, 2048, 10)]
    assert default_plan(SDXL).total_steps == 50


def test_gamma_is_pixel_ratio_and_one_at_stage_one():
    plan = default_plan(SD15)
    assert [plan.gamma(k) for k in range(3)] == [1.0, 2.25, 4.0]


@pytest.mark.parametrize("w,h", [(1920, 1080), (2048, 1536), (640, 2560), (2560, 1080), (1024, 1024), (1000, 700)])
@pytest.mark.parametrize("family", [SD15, SDXL])
def test_any_aspect_ratio(family, w, h):
    if w * h < family.native_pixels:
        pytest.skip("below native size")
    plan = default_plan(family, w, h)
    m = family.pixel_multiple
    first, last = plan.stages[0], plan.stages[-1]
    assert (plan.output_width, plan.output_height) == (w, h)
    for s in plan.stages:
        assert s.width % m == 0 and s.height % m == 0
    # stage 1 keeps the aspect ratio at about the native pixel count
    assert abs(first.width / first.height - w / h) < 0.35 * (w / h)
    assert 0.75 <= first.pixels / family.native_pixels <= 1.35
    assert last.width - m < w <= last.width and last.height - m < h <= last.height
    for a, b in zip(plan.stages, plan.stages[1:]):
        assert b.width >= a.width and b.height >= a.height


def test_native_size_is_one_stage():
    plan = default_plan(SDXL, 1024, 1024)
    assert _sizes(plan) == [(1024, 1024, 50)]


def test_total_steps_keeps_proportions():
    plan = default_plan(SD15, total_steps=20)
    assert plan.total_steps == 20 and len(plan.stages) == 3


def test_parse_size_and_stages():
    assert parse_size("1920x1080") == (1920, 1080)
    stages = parse_stages("1024x1024:40,2048x1536:10")
    assert stages == [Stage(1024, 1024, 40), Stage(1536, 2048, 10)]


@pytest.mark.parametrize("text", ["1920", "1920x", "x1080", "axb", "0x100", "-5x100", "100x99999", ""])
def test_malformed_size_names_value(text):
    with pytest.raises(PlanError, match="size"):
        parse_size(text)


@pytest.mark.parametrize("stages,needle", [
    ([Stage(1024, 1024, 0)], "0 steps"),
    ([Stage(1024, 1024, -3)], "-3 steps"),
    ([Stage(512, 512, 10)], "smaller than sdxl's native"),
    ([Stage(1024, 1024, 40), Stage(1000, 2048, 10)], "height 1000 is not a positive multiple of 32"),
    ([Stage(2048, 2048, 40), Stage(1024, 2048, 10)], "smaller than stage 1"),
    ([Stage(1024, 1024, 600), Stage(2048, 2048, 600)], "1200 steps"),
])
def test_bad_plans(stages, needle):
    with pytest.raises(PlanError, match=needle):
        validate_plan(SDXL, stages)


def test_output_must_fit_last_stage():
    with pytest.raises(PlanError, match="does not fit"):
        validate_plan(SDXL, [Stage(1024, 1024, 40)], 900, 1024)
    assert validate_plan(SDXL, [Stage(1088, 1920, 50)], 1920, 1080).output_height == 1080


def test_size_below_native_refused():
    with pytest.raises(PlanError, match="256x256"):
        default_plan(SD15, 256, 256)


def test_tiny_model_follows_same_rules():
    plan = default_plan(TINY_SDXL, 448, 192)
    assert plan.stages[-1].width % 32 == 0 and (plan.output_width, plan.output_height) == (448, 192)


# --- large sizes: past 2x per relay, stages are added (docs/ALGORITHM.md §2, "Large sizes") ---

@pytest.mark.parametrize("family,w,h,expected", [
    (SDXL, 4096, 4096, [(1024, 1024, 40), (2048, 2048, 5), (4096, 4096, 5)]),
    (SDXL, 8192, 8192, [(1024, 1024, 40), (2048, 2048, 4), (4096, 4096, 3), (8192, 8192, 3)]),
    (SD15, 2048, 2048, [(512, 512, 40), (1024, 1024, 5), (2048, 2048, 5)]),
    (SD15, 4096, 4096, [(512, 512, 40), (1024, 1024, 4), (2048, 2048, 3), (4096, 4096, 3)]),
    (SDXL, 3840, 2160, [(1376, 768, 40), (2304, 1280, 5), (3840, 2176, 5)]),
    (SDXL, 4096, 1024, [(2048, 512, 40), (4096, 1024, 10)]),  # 2x a side: the template's two stages
])
def test_large_sizes_relay_at_most_2x_per_side(family, w, h, expected):
    plan = default_plan(family, w, h)
    assert _sizes(plan) == expected and plan.total_steps == 50
    for a, b in zip(plan.stages, plan.stages[1:]):
        assert b.width <= 2 * a.width and b.height <= 2 * a.height


def test_large_plans_reschedule_by_pixel_ratio_to_stage_one():
    plan = default_plan(SDXL, 8192, 8192)
    assert [plan.gamma(k) for k in range(4)] == [1.0, 4.0, 16.0, 64.0]


def test_templates_within_2x_per_relay_are_unchanged():
    # SD1.5's linear 512 -> 768 -> 1024 reaches 3x per side before its first relay passes 2x
    assert _sizes(default_plan(SD15, 1920, 1080)) == [(704, 384, 40), (1280, 768, 5), (1920, 1088, 5)]
    assert _sizes(default_plan(SDXL, 2048, 2048)) == [(1024, 1024, 40), (2048, 2048, 10)]


def test_large_plan_with_total_steps_keeps_proportions():
    plan = default_plan(SDXL, 4096, 4096, total_steps=20)
    assert _sizes(plan) == [(1024, 1024, 16), (2048, 2048, 2), (4096, 4096, 2)]
    with pytest.raises(PlanError, match="3 steps cannot fill a 4-stage plan"):
        default_plan(SDXL, 8192, 8192, total_steps=3)
