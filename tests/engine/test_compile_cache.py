"""Warm start of the compiled path: a second process loads the compiled functions the first kept
(engine/precompiled.py) and traces nothing, with the same result. Each process gets an empty Inductor cache
folder of its own, so what it reuses can only come from the compile cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from megafusion.engine.compile_cache import CompileCache, CompileKey, cacheable

from tests.background import BUILDS

DRIVER = """
import json, sys, torch
from megafusion.core.loading import load_model
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine.compile_cache import CompileCache, compile_key, compile_profile, inductor_counts
from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
bundle = load_model("tiny-sd15")
nets = FastTorchNetworks(bundle, FastOptions(compile_vae=False, cudnn_benchmark=False))
plan = validate_plan(bundle.family, parse_stages("128x128:2"))
cache, key = CompileCache(sys.argv[1]), compile_key(nets, "cpu", plan)
loaded = cache.load(key)
nets.keep_compiled(cache.functions(key))
result = MegaFusionPipeline(bundle, nets, "cpu").generate(plan, GenerationOptions("a red cube", seed=1))
saved = None if loaded else cache.save(key)
torch.save(result.latent, sys.argv[2])
print(json.dumps({"loaded": loaded, "saved": saved is not None, **inductor_counts(), "profile": compile_profile(),
                  "functions": nets.precompile_counters()}))
"""


def _run(cache_dir, out, inductor_dir):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(cache_dir), str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def compile_cache_first():
    """The first process's report; tests/conftest.py runs it beside the tests, into BUILDS.folder('compile-cache')."""
    return json.loads(BUILDS.get("compile_cache_first").stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_traces_nothing(compile_cache_first, tmp_path):
    first, root = compile_cache_first, BUILDS.folder("compile-cache")
    assert not first["loaded"] and first["saved"]
    traced = first["functions"]["traced"]
    assert traced >= 1 and first["functions"] == {"traced": traced, "loaded": 0, "saved": traced, "rejected": 0}
    second = _run(root / "cc", tmp_path / "b.pt", tmp_path / "inductor-b")
    seconds, counts = second["profile"]
    assert second["loaded"] and not second["saved"]
    assert second["functions"] == {"traced": 0, "loaded": traced, "saved": 0, "rejected": 0}
    # Dynamo's own timers agree: nothing traced, no backend run, no FX graph looked up
    assert seconds["tracing"] == 0 and seconds["backend"] == 0 and counts["fx graph miss"] == 0
    assert torch.equal(torch.load(root / "a.pt"), torch.load(tmp_path / "b.pt"))


def _key(**kw) -> CompileKey:
    base = CompileKey("tiny-sd15", "ab" * 32, "torch.float32", "torch.float32", "FastOptions()",
                      "128x128:40 relay pixel batch 2", "2.13.0", "cpu")
    return replace(base, **kw)


def test_key_covers_what_the_code_depends_on():
    digests = {_key().digest(), _key(unet_dtype="torch.float16").digest(), _key(options="other").digest(),
               _key(torch="2.11.0").digest(), _key(device="NVIDIA H200").digest(), _key(architecture="cd" * 32).digest(),
               _key(shapes="128x128:40 relay pixel batch 1").digest(), _key(code="diffusers 0.1").digest()}
    assert len(digests) == 8


def test_key_names_the_traced_code_versions(monkeypatch):
    from importlib import metadata

    from megafusion.engine import compile_cache

    real = metadata.version
    compile_cache.traced_code.cache_clear()
    code = compile_cache.traced_code()
    assert f"diffusers {real('diffusers')}" in code and "megafusion " in code
    # another environment (here: diffusers reported as another release, peft as absent) is another key
    monkeypatch.setattr(metadata, "version", lambda n: "9.9" if n == "diffusers" else
                        (_ for _ in ()).throw(metadata.PackageNotFoundError(n)) if n == "peft" else real(n))
    compile_cache.traced_code.cache_clear()
    try:
        other = compile_cache.traced_code()
    finally:
        compile_cache.traced_code.cache_clear()
    assert "diffusers 9.9" in other and "peft -" in other and other != code


def test_missing_foreign_or_damaged_artifacts_are_not_loaded(tmp_path):
    cache = CompileCache(tmp_path)
    assert not cache.load(_key())  # nothing there
    data, meta = cache._paths(_key())
    data.write_bytes(b"not artifacts")
    meta.write_text(json.dumps({"key": {}, "sha256": "0" * 64}))
    assert not cache.load(_key())  # another key's record
    import dataclasses
    import hashlib

    meta.write_text(json.dumps({"key": dataclasses.asdict(_key()), "sha256": hashlib.sha256(b"other").hexdigest()}))
    assert not cache.load(_key())  # data that does not match its record


def test_freezing_is_not_cached(tiny_sd15):
    from megafusion.engine.torch_fast import FastOptions

    class Nets:
        options = FastOptions(inductor_options=(("freezing", True),))

    assert "freezing" in cacheable(Nets())
    Nets.options = FastOptions()
    assert cacheable(Nets()) == ""


def test_inductor_cache_lives_in_the_compile_cache_unless_the_user_chose(tmp_path, monkeypatch):
    from megafusion.engine.compile_cache import keep_inductor_caches

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert keep_inductor_caches(tmp_path) == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path.resolve() / "inductor")}
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve() / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    assert keep_inductor_caches(tmp_path) == {} and os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
