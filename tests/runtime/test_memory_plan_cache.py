"""The memory estimate kept between starts (runtime/memory_cache.py): a second start reuses it, anything it depends
on computes it again, and a damaged file is ignored and rewritten, never trusted."""
from __future__ import annotations

import json

import pytest
import torch

from megafusion.core.families import TINY_SDXL
from megafusion.core.memory import GiB, MemoryEstimate
from megafusion.core.plan import Stage, validate_plan
from megafusion.runtime.memory_cache import FILE, EstimateCache, default_path
from megafusion.runtime.memory_plan import plan_memory
from megafusion.runtime.vae_tiling import VaeTiling

PLAN = validate_plan(TINY_SDXL, [Stage(128, 128, 2), Stage(256, 256, 2)])


def _plan(cache, plan=PLAN, dtype=torch.float32, **kw):
    return plan_memory(TINY_SDXL, plan, dtype, torch.float32, GiB, cache=cache, **kw)


@pytest.fixture
def counted(monkeypatch):
    """The estimator replaced by a quick one that counts its calls (the cache's logic is under test, not it)."""
    import megafusion.runtime.memory_plan as mp

    calls = []

    def fake(family, plan, unet_dtype, vae_dtype, cfg, relay, passes, graph_pool):
        calls.append(1)
        size = sum(s.height * s.width for s in plan.stages) * unet_dtype.itemsize * (2 if cfg else 1)
        return MemoryEstimate(size, (("stage 1", 7 + graph_pool), ("decode", 3 + (passes is not None))), (), 0)

    monkeypatch.setattr(mp, "estimate_memory", fake)
    return calls


def test_second_start_reuses_the_estimate(tmp_path):
    path = tmp_path / FILE
    first = EstimateCache(path)
    a = _plan(first)
    assert (first.computed, first.reused) == (1, 0) and path.is_file()
    again = EstimateCache(path)  # a new process: only the file carries the estimate over
    b = _plan(again)
    assert (again.computed, again.reused) == (0, 1)
    assert b == a and b.estimate == _plan(None).estimate  # what the estimator gives, not a stale value
    steps = validate_plan(TINY_SDXL, [Stage(128, 128, 7), Stage(256, 256, 3)])  # steps change no shape
    _plan(again, steps)
    assert (again.computed, again.reused) == (0, 2)


@pytest.mark.parametrize("change", [
    {"plan": validate_plan(TINY_SDXL, [Stage(128, 128, 2), Stage(256, 384, 2)])},
    {"dtype": torch.bfloat16},
    {"cfg": False},
    {"graph_pool": True},
    {"when": "on", "tiling": VaeTiling(128)},
])
def test_a_changed_plan_computes_again(tmp_path, change, counted):
    cache = EstimateCache(tmp_path / FILE)
    base = _plan(cache)
    other = _plan(cache, **change)
    assert cache.computed == len(counted) == 2  # the base and the changed one ("on" reuses the untiled one)
    assert other.estimate != base.estimate


def test_damaged_file_is_ignored_and_rewritten(tmp_path, counted):
    path = tmp_path / FILE
    ref = _plan(EstimateCache(path)).estimate
    good = json.loads(path.read_text())
    key = next(iter(good["entries"]))
    for damage in ("{not json", json.dumps({"scheme": 999, "entries": good["entries"]}),
                   json.dumps({"scheme": 1, "entries": {key: {**good["entries"][key], "weights": -5}}}),
                   json.dumps({"scheme": 1, "entries": {key: {"segments": "x"}}}), "\xff\xfe"):
        path.write_text(damage)
        cache = EstimateCache(path)
        assert _plan(cache).estimate == ref and cache.computed == 1 and cache.reused == 0, damage
        assert json.loads(path.read_text())["entries"][key] == good["entries"][key]  # rewritten whole


def test_unwritable_folder_costs_a_recomputation_only(tmp_path, counted):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = EstimateCache(blocker / "sub" / FILE)  # its parent cannot be made
    assert _plan(cache).estimate == _plan(None).estimate and cache.computed == 1 and len(counted) == 2


def test_where_the_file_lives(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGAFUSION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "megafusion" / FILE
    assert default_path(tmp_path / "engines") == tmp_path / "engines" / FILE
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: ignored unless absolute
    assert default_path() == default_path.__globals__["Path"]("~/.cache/megafusion").expanduser() / FILE
    monkeypatch.setenv("MEGAFUSION_CACHE", str(tmp_path / "mf"))
    assert default_path() == tmp_path / "mf" / FILE


@pytest.mark.slow
def test_dry_run_twice_reuses_the_estimate(tmp_path, monkeypatch, capsys):
    from megafusion.cli.generate import main

    monkeypatch.setenv("MEGAFUSION_CACHE", str(tmp_path))
    args = ["--model", "tiny-sdxl", "--prompt", "x", "--size", "256x256", "--device", "cpu", "--dry-run"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    assert f"memory estimates: 0 reused, 1 computed ({tmp_path / FILE})" in first
    assert "memory estimates: 1 reused, 0 computed" in second
    strip = [line for line in first.splitlines() if "memory estimates:" not in line]
    assert strip == [line for line in second.splitlines() if "memory estimates:" not in line]
    assert main([*args[:5], "320x256", *args[6:]]) == 0  # another size: computed again
    assert "0 reused, 1 computed" in capsys.readouterr().out
