"""mf-generate estimates a plan's peak memory before loading anything (core/memory.py): a plan that cannot fit
the device, or --max-memory, is one line naming the estimate; --dry-run prints plan, estimate and cost and
loads nothing."""
from __future__ import annotations

import os

import pytest

from megafusion.cli import generate as gen_cli

PROMPT = ["--prompt", "a red cube"]


pytestmark = pytest.mark.usefixtures("no_model_load")  # the memory check comes before any load


def test_a_plan_larger_than_the_machine_is_refused_naming_the_estimate(tmp_path, capsys):
    out = tmp_path / "big.png"
    assert gen_cli.main(["--model", "tiny-sdxl", *PROMPT, "--size", "16384x16384", "--no-vae-tile",
                         "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an estimated" in err and "final decode 16384x16384" in err
    assert "this machine's memory" in err and not out.exists()


def test_max_memory_refuses_and_checks_its_value(tmp_path, capsys):
    args = ["--model", "tiny-sdxl", *PROMPT, "--size", "1024x1024", "--output", str(tmp_path / "a.png")]
    assert gen_cli.main([*args, "--max-memory", "0.01"]) == 2
    assert "more than --max-memory (0.01 GiB)" in capsys.readouterr().err
    for bad in ("-1", "0", "nan"):
        assert gen_cli.main([*args, "--max-memory", bad]) == 2
        assert f"--max-memory {float(bad)}: must be a number of GiB > 0" in capsys.readouterr().err


def test_dry_run_prints_plan_estimate_and_cost_and_loads_nothing(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert gen_cli.main(["--model", "tiny-sd15", *PROMPT, "--size", "256x256", "--dry-run", "--output",
                         str(out)]) == 0
    said = capsys.readouterr().out
    assert "plan: 128x128 x40 -> 192x192 x5 -> 256x256 x5" in said
    assert "estimated peak device memory" in said and "relay 2->3 encode 256x256" in said
    assert "cost:" in said and "TFLOP" in said and not out.exists()


def test_vae_tile_flags_are_checked_before_anything(tmp_path, capsys):
    args = ["--model", "tiny-sdxl", *PROMPT, "--output", str(tmp_path / "a.png")]
    assert gen_cli.main([*args, "--vae-tile-size", "100"]) == 2
    assert "--vae-tile-size 100: VAE tile size 100: must be a multiple of 64" in capsys.readouterr().err
    assert gen_cli.main([*args, "--vae-tile-size", "512", "--no-vae-tile"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_dry_run_names_the_tiling_and_a_refusal_names_the_tiled_estimate(tmp_path, capsys):
    args = ["--model", "tiny-sdxl", *PROMPT, "--stages", "128x128:1,512x512:1", "--vae-tile", "--vae-tile-size",
            "256", "--output", str(tmp_path / "a.png")]
    assert gen_cli.main([*args, "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "final decode 512x512 (tiled 256)" in said and "VAE tiled, 256-pixel tiles: asked for" in said
    assert gen_cli.main([*args, "--max-memory", "0.001"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with the VAE in 256-pixel tiles" in err and "(tiled 256)" in err


def test_max_memory_caps_cudnn_workspaces(monkeypatch):
    from megafusion.cli.common import CUDNN_WORKSPACE_ENV, cap_cudnn_workspace

    monkeypatch.delenv(CUDNN_WORKSPACE_ENV, raising=False)
    assert cap_cudnn_workspace(16) == 1638 and os.environ[CUDNN_WORKSPACE_ENV] == "1638"  # a tenth of 16 GiB
    monkeypatch.delenv(CUDNN_WORKSPACE_ENV)
    assert cap_cudnn_workspace(1) == 256 and cap_cudnn_workspace(100) is None  # the floor; a set value stays
    monkeypatch.setenv(CUDNN_WORKSPACE_ENV, "64")
    assert cap_cudnn_workspace(100) is None and os.environ[CUDNN_WORKSPACE_ENV] == "64"
    monkeypatch.delenv(CUDNN_WORKSPACE_ENV)
    assert cap_cudnn_workspace(200) == 4096  # the ceiling


def test_max_memory_bounds_what_pytorch_reserves(monkeypatch):
    """--max-memory on CUDA sets the caching allocator's per-process fraction from the budget (capped at the whole
    device), so reserved memory stays under it; checked on the CPU through the calls it makes."""
    import torch

    from megafusion.cli.common import cap_device_memory

    seen = []
    props = type("Props", (), {"total_memory": 140 * 2**30})()

    def set_fraction(f, device):
        # torch raises for a device without an index (a bare "cuda" crashed --max-memory on the H200)
        assert isinstance(device, int), device
        seen.append((f, device))

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cap_device_memory(35, "cuda:1") == 0.25 and seen == [(0.25, 1)]
    assert cap_device_memory(500, "cuda") == 1.0 and seen[-1] == (1.0, 0)
    assert cap_device_memory(35, torch.device("cuda")) == 0.25 and seen[-1] == (0.25, 0)


def test_the_cap_asks_for_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    import torch

    from megafusion.cli.common import ALLOCATOR_ENV, cap_device_memory

    settings = []
    props = type("Props", (), {"total_memory": 140 * 2**30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: None)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", settings.append)
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    cap_device_memory(32, "cuda:0")
    assert settings == ["expandable_segments:True"]
    monkeypatch.setenv(ALLOCATOR_ENV, "max_split_size_mb:512")  # the user's choice stands
    cap_device_memory(32, "cuda:0")
    assert settings == ["expandable_segments:True"]


def test_one_shot_runs_on_cuda_ask_for_expandable_segments(monkeypatch, capsys):
    """mf-generate on CUDA, engines or torch modules, sets expandable segments (the freed graph pools serve the next
    stage, #15's 16 GiB), unless the user configured the allocator, --max-memory did it already, or the run is not
    on CUDA."""
    import argparse

    import torch

    from megafusion.cli.common import ALLOCATOR_ENV
    from megafusion.cli.generate import one_shot_allocator

    settings = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", settings.append)
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    engines = argparse.Namespace(engines="/e", max_memory=None)
    assert not one_shot_allocator(engines, cpu)
    assert not one_shot_allocator(argparse.Namespace(engines="/e", max_memory=32.0), cuda)
    assert settings == []
    assert one_shot_allocator(engines, cuda) and settings == ["expandable_segments:True"]
    assert "expandable segments" in capsys.readouterr().out
    assert one_shot_allocator(argparse.Namespace(engines=None, max_memory=None), cuda)  # the torch modes too
    settings.clear()
    monkeypatch.setenv(ALLOCATOR_ENV, "max_split_size_mb:512")  # the user's choice stands
    assert not one_shot_allocator(engines, cuda) and settings == []


def test_vae_tile_park_is_said_in_a_dry_run_and_in_a_refusal(tmp_path, capsys):
    args = ["--model", "tiny-sdxl", *PROMPT, "--stages", "128x128:1,384x256:1", "--vae-tile", "park",
            "--vae-tile-size", "128", "--output", str(tmp_path / "a.png")]
    assert gen_cli.main([*args, "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "final decode 384x256 (tiled 128, parked)" in said and "host memory for parked VAE tiles" in said
    assert "VAE tiled, 128-pixel tiles, parked in host memory" in said and "asked for" in said
    assert gen_cli.main([*args, "--max-memory", "0.001"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with the VAE in 128-pixel tiles parked in host memory" in err
    with pytest.raises(SystemExit) as bad:  # argparse's one line
        gen_cli.main([*args[:-2], "--vae-tile", "sometimes", *args[-2:]])
    assert bad.value.code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err
