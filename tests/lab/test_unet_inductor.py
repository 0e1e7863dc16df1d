"""benchmarks/unet_inductor.py's pure parts on CPU: parsing, the plan-weighted choice of set, the reports, and
the UNet call it compiles (run eagerly on tiny-sdxl). torch.compile itself only runs on the GPU."""
from __future__ import annotations

import json

import pytest
import torch

import fastpath
from megafusion.benchmarks.flops import MetaCostCounter
from unet_inductor import (best_set, main, parse_sets, parse_shapes, parse_steps,
                                                 plan_summary, save, unet_call, unet_inputs)
from megafusion.engine.torch_fast import INDUCTOR_SETS, FastOptions
from megafusion.core.dilation import mid_dilation_of
from megafusion.core.loading import load_model

SHAPES, STEPS = [(1024, 1), (2048, 2)], [40, 10]


def _row(name: str, side: int, dilation: int, ms: float) -> dict:
    return {"set": name, "side": side, "dilation": dilation, "graph_ms": ms, "kernel_sum_ms": ms - 1}


ROWS = [_row("default", 1024, 1, 10.0), _row("default", 2048, 2, 50.0), _row("gemm", 1024, 1, 9.0),
        _row("gemm", 2048, 2, 52.0), _row("freezing", 1024, 1, 8.0),
        {"set": "freezing", "side": 2048, "dilation": 2, "error": "BackendCompilerFailed: a | b"},
        _row("coord", 1024, 1, 1.0)]  # coord: killed before its second shape


def test_parse_sets_puts_default_first_and_names_unknown_sets():
    assert parse_sets("gemm,default,gemm") == ["default", "gemm"]
    assert parse_sets("freezing, gemm+freezing") == ["freezing", "gemm+freezing"]
    with pytest.raises(ValueError, match=r"'nosuch'.*default, freezing, gemm"):
        parse_sets("default,nosuch")
    with pytest.raises(ValueError, match="no Inductor set"):
        parse_sets(",")


def test_cli_rejects_an_unknown_set_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--sets", "gemm,nosuch"])
    assert e.value.code == 2 and "'nosuch'" in capsys.readouterr().err


def test_parse_shapes_and_steps():
    assert parse_shapes("1024:1,2048:2") == SHAPES
    assert parse_shapes(" 1024 ") == [(1024, 1)]
    with pytest.raises(ValueError, match="'2048x2'"):
        parse_shapes("1024:1,2048x2")
    assert parse_steps("40,10", 2) == STEPS
    with pytest.raises(ValueError, match="1 values for 2 shapes"):
        parse_steps("40", 2)


def test_sets_are_inductor_config_keys():
    missing = [k for opts in INDUCTOR_SETS.values() for k, _ in opts if not hasattr(torch._inductor.config, k)]
    assert missing == []
    assert set(INDUCTOR_SETS["gemm+freezing"]) == set(INDUCTOR_SETS["gemm"]) | set(INDUCTOR_SETS["freezing"])
    assert FastOptions(inductor_options=INDUCTOR_SETS["default"]) == FastOptions()


def test_plan_weighted_summary_and_best_set():
    summary = plan_summary(ROWS, SHAPES, STEPS)
    assert summary == {"default": 40 * 10 + 10 * 50, "gemm": 40 * 9 + 10 * 52, "freezing": None, "coord": None}
    assert best_set(summary) == "gemm"  # freezing and coord are faster at 1024 but incomplete
    assert best_set({"default": None}) is None


def test_reports_survive_a_json_round_trip(tmp_path):
    report = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "model": "sdxl", "sets": {},
              "shapes": SHAPES, "steps": STEPS, "rows": ROWS}
    save(tmp_path, report)
    data = json.loads((tmp_path / "unet_inductor.json").read_text())
    assert data["best"] == "gemm" and data["summary_ms"]["gemm"] == 880.0
    assert plan_summary(data["rows"], data["shapes"], data["steps"]) == data["summary_ms"]  # shapes now lists
    md = (tmp_path / "unet_inductor.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "torch 2.11.0" in md and "Best set: gemm" in md
    assert "a / b" in md  # a pipe in an error message would split its table row


def test_unet_call_runs_the_dilated_variant_and_restores_it(tiny_sdxl):
    unet = tiny_sdxl.unet
    inputs = unet_inputs(tiny_sdxl, 128, torch.device("cpu"), torch.float32)
    assert inputs[0].shape == (2, 4, 16, 16) and inputs[3]["text_embeds"].shape == (2, 32)
    assert inputs[3]["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]] * 2
    standard, dilated = (unet_call(unet, unet, inputs, d)() for d in (1, 2))
    assert standard.shape == (2, 4, 16, 16) and mid_dilation_of(unet) == 1
    assert (standard - dilated).abs().max() > 1e-4
    assert torch.equal(unet_inputs(tiny_sdxl, 128, torch.device("cpu"), torch.float32)[0], inputs[0])  # seeded
    assert MetaCostCounter(tiny_sdxl.family).unet(128, 128, 2, 2).flops > 0


def test_fastpath_compiled_at_set(tiny_sdxl, monkeypatch):
    with pytest.raises(ValueError, match=r"'nosuch'.*'compiled@nosuch'.*gemm\+freezing"):
        fastpath._pipeline("compiled@nosuch", tiny_sdxl, None)
    assert not any(getattr(m, "fused_projections", False) for m in tiny_sdxl.unet.modules())  # left untouched
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    pipe = fastpath._pipeline("compiled@gemm", load_model("tiny-sdxl"), None)  # compiles lazily: nothing runs
    assert pipe.nets.options.inductor_options == INDUCTOR_SETS["gemm"]
