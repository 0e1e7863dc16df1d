"""mf-generate --mode compiled's warm start, wired without a GPU (the mode itself needs CUDA): Inductor's cache goes
into the compile cache before the model load (whose imports make Inductor fix its folder), `warm_start` puts every
compiled call site on the key's functions folder, and the line printed after the first image reads their counters."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from megafusion.cli.warm_start import keep_compiled_kernels, precompile_line, warm_start
from megafusion.core.loading import load_model
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks


def test_inductor_cache_is_placed_before_the_model_load(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    args = SimpleNamespace(no_compile_cache=False, compile_cache=str(tmp_path / "cc"))
    assert keep_compiled_kernels(args, "graphs") == {} and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert keep_compiled_kernels(SimpleNamespace(no_compile_cache=True, compile_cache=None), "compiled") == {}
    want = str((tmp_path / "cc").resolve() / "inductor")
    assert keep_compiled_kernels(args, "compiled") == {"TORCHINDUCTOR_CACHE_DIR": want}
    load_model("tiny-sd15")  # its imports would have fixed Inductor's folder had it been unset
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == want


def test_warm_start_attaches_every_call_site(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    nets = FastTorchNetworks(load_model("tiny-sd15"), FastOptions(cudnn_benchmark=False))
    plan = validate_plan(nets.bundle.family, parse_stages("128x128:2,192x192:1"))
    args = SimpleNamespace(no_compile_cache=False, compile_cache=str(tmp_path / "cc"))
    cache, key, loaded = warm_start(args, nets, "cpu", plan, "pixel", True)
    assert not loaded and len(nets.precompiled) == 3  # UNet, VAE decode, VAE encode
    assert {site.folder for site in nets.precompiled} == {cache.functions(key)}
    assert precompile_line(nets) == "compiled functions: 0 loaded, 0 traced, 0 saved, 0 rejected"
    assert warm_start(SimpleNamespace(no_compile_cache=True, compile_cache=None), nets, "cpu", plan, "pixel",
                      True) is None


def test_bench_cold_starts_carry_work_over_only_in_the_compile_cache(tmp_path):
    from megafusion.cli.bench import _cold_commands
    from megafusion.core.families import get_family
    from megafusion.core.plan import default_plan

    args = SimpleNamespace(model="tiny-sd15", device="cpu", prompt="p", negative_prompt="", model_path=None,
                           random_weights=False, weights_seed=None, dtype=None, vae_dtype=None, engine_dir=None)
    rows = _cold_commands(args, ["compiled"], default_plan(get_family("tiny-sd15"), 256, 256), 7.0, 0, tmp_path)
    assert [name for name, _, _ in rows] == ["compiled, empty caches", "compiled, warm compile cache"]
    cache = tmp_path / "compile-cache"
    for _, argv, env in rows:
        assert argv[argv.index("--compile-cache") + 1] == str(cache)
        assert all(Path(v).is_relative_to(cache) for v in env.values()) and "TORCHINDUCTOR_CACHE_DIR" in env
