"""mf-serve --mode compiled keeps what its replicas compile (serve/model.py `served_compile_cache`,
engine/precompiled.py), SD3 / FLUX replicas too: a restarted replica loads the compiled functions of its served
sizes instead of tracing them, and the flags are refused where they mean nothing. The replica runs on the CPU here with a cheap backend in place of Inductor
(tests/engine/test_precompiled.py `_backend`); the key, the folder and the counters are what is tested."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megafusion.engine import torch_fast
from megafusion.engine.precompiled import precompile_missing
from megafusion.serve.config import ConfigError, ServeConfig, check_config
from megafusion.serve.model import ModelServer

from tests.engine.test_precompiled import _backend


@pytest.mark.parametrize("kw, words", [
    ({"compile_cache": "/tmp/cc", "mode": "graphs", "device": "cuda"}, "--compile-cache: only with --mode compiled"),
    ({"no_compile_cache": True}, "--no-compile-cache: only with --mode compiled"),
    ({"compile_cache": "/tmp/cc", "no_compile_cache": True, "mode": "compiled", "device": "cuda"},
     "exclude each other"),
])
def test_flags_without_compiled_mode_are_refused(kw, words):
    with pytest.raises(ConfigError, match=words):
        check_config(ServeConfig("tiny-sd15", **kw))


def test_a_compile_cache_that_is_a_file_is_refused(tmp_path):
    bad = tmp_path / "cc"
    bad.write_text("a file")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        check_config(ServeConfig("tiny-sd15", mode="compiled", device="cuda", compile_cache=str(bad)))


@pytest.mark.skipif(bool(precompile_missing()), reason=precompile_missing() or "")
def test_a_restarted_flow_replica_loads_its_transformer(tmp_path, monkeypatch):
    """SD3 / FLUX replicas (serve/flow_model.py) keep their compiled transformer the same way, per served size."""
    from megafusion.engine import flow_networks
    from megafusion.serve.flow_model import FlowModelServer

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(flow_networks, "compile_with", lambda fn, options, guard_filter=None: torch.compile(
        fn, fullgraph=True, dynamic=False, backend=_backend(), options={"guard_filter_fn": guard_filter}))
    cfg = ServeConfig("tiny-flux", mode="compiled", sizes=((160, 160),), compile_cache=str(tmp_path / "cc"))
    check_config(replace(cfg, device="cuda"))  # the flag is taken for these families
    first = FlowModelServer(cfg)
    first.warm_up()
    assert first.compile_cache[2] is False
    assert first.nets.precompile_counters() == {"traced": 2, "loaded": 0, "saved": 2, "rejected": 0}  # 2 stages
    again = FlowModelServer(cfg)
    again.warm_up()
    assert again.compile_cache[2] is True
    assert again.nets.precompile_counters() == {"traced": 0, "loaded": 2, "saved": 0, "rejected": 0}


@pytest.mark.skipif(bool(precompile_missing()), reason=precompile_missing() or "")
def test_a_restarted_replica_loads_instead_of_tracing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the test process's, restored after
    monkeypatch.setattr(torch_fast, "compile_with", lambda fn, options, guard_filter=None: torch.compile(
        fn, fullgraph=True, dynamic=False, backend=_backend(), options={"guard_filter_fn": guard_filter}))
    cfg = ServeConfig("tiny-sd15", mode="compiled", sizes=((256, 256),), compile_cache=str(tmp_path / "cc"))
    first = ModelServer(cfg)
    first.warm_up()
    traced = first.nets.precompile_counters()["traced"]
    assert traced >= 5 and first.compile_cache[2] is False  # the UNet per stage shape, VAE decodes and encodes
    assert len(list((tmp_path / "cc").glob("compiled-*-functions/*.bin"))) == traced

    again = ModelServer(cfg)  # a restart: new modules, new call sites, the same folder
    again.warm_up()
    assert again.compile_cache[2] is True
    assert again.nets.precompile_counters() == {"traced": 0, "loaded": traced, "saved": 0, "rejected": 0}

    off = ModelServer(ServeConfig("tiny-sd15", mode="compiled", sizes=((128, 128),), no_compile_cache=True))
    assert off.compile_cache is None
