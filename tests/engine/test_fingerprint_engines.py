"""Engines keyed by scheme-2 fingerprints: a run opens them without building the torch modules they replace,
entries of the old scheme are refused naming the entry and the rebuild command, and engine files whose hashes are
remembered are still checked against the manifest when they change."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from megafusion.core.loading import load_model
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine import file_hashes
from megafusion.engine.cache import CorruptEngineError, EngineCache, EngineKey, StaleEngineError
from megafusion.engine.file_hashes import HASHES, FileHashes
from megafusion.engine.load import open_engines, select_engines
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

from tests.engines import STAGES, build

ALL = frozenset({"unet", "vae", "text_encoder", "text_encoder_2"})


def _plan(family):
    return validate_plan(family, parse_stages(STAGES))


def test_engines_open_without_the_torch_modules_they_replace(tiny_sdxl, sdxl_engines):
    plan = _plan(tiny_sdxl.family)
    served = select_engines(sdxl_engines, tiny_sdxl.family, "random:0", plan).modules_served()
    assert served == ALL  # onnxruntime engines run every network, text encoders included
    bare = load_model("tiny-sdxl", skip=served)
    for m in (bare.unet, bare.vae, *bare.text_encoders):
        assert all(t.device.type == "meta" for t in m.parameters())  # built without weights
    nets, _ = open_engines(sdxl_engines, bare, plan)
    ref_nets, _ = open_engines(sdxl_engines, tiny_sdxl, plan)
    opts = GenerationOptions("a red fox", seed=3)
    got = MegaFusionPipeline(bare, nets, "cpu").generate(plan, opts)
    want = MegaFusionPipeline(tiny_sdxl, ref_nets, "cpu").generate(plan, opts)
    assert np.array_equal(got.image, want.image) and got.image.std() > 1  # same engines, same inputs: same image


def test_a_backend_that_runs_the_modules_loads_them(tiny_sd15, tmp_path):
    build(tiny_sd15, tmp_path, backend="torch")
    sel = select_engines(tmp_path, tiny_sd15.family, "random:0", _plan(tiny_sd15.family))
    assert sel.backend.runs_modules and sel.modules_served() == frozenset()


def _as_scheme_1(folder):
    """The manifest as a build before fingerprint schemes wrote it: bare sha256 weights, digests to match."""
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    for e in data["entries"]:
        e["key"]["weights"] = "ab" * 32
        e["digest"] = EngineKey.from_json(e["key"]).digest()
    path.write_text(json.dumps(data))


def test_old_scheme_entries_are_refused_naming_entry_and_command(tiny_sdxl, sdxl_copy, capsys):
    from megafusion.cli.generate import main

    _as_scheme_1(sdxl_copy)
    with pytest.raises(StaleEngineError, match=r"\(entry [0-9a-f]{16}\) .*weights fingerprint scheme 1 .*rebuild "
                                               r"with: mf-build-engines --model tiny-sdxl"):
        open_engines(sdxl_copy, tiny_sdxl, _plan(tiny_sdxl.family))
    rc = main(["--model", "tiny-sdxl", "--stages", STAGES, "--engines", str(sdxl_copy), "--prompt", "a fox",
               "--output", str(sdxl_copy / "x.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "fingerprint scheme 1" in err and "mf-build-engines" in err
    assert not (sdxl_copy / "x.png").exists()


def test_remembered_engine_hashes_still_catch_a_changed_file(tiny_sdxl, sdxl_copy, monkeypatch):
    monkeypatch.setattr(file_hashes, "RACY_NS", 50_000_000)
    time.sleep(0.1)
    plan = _plan(tiny_sdxl.family)
    open_engines(sdxl_copy, tiny_sdxl, plan)  # hashes every engine file and remembers them
    cache = EngineCache(sdxl_copy)
    entry = next(e for e in cache.entries().values() if e.key.variant == "dilated")
    hashes = FileHashes(sdxl_copy / HASHES)
    assert hashes.lookup(sdxl_copy / entry.files[0].path, (sdxl_copy / entry.files[0].path).stat()) is not None
    reads = []
    real = file_hashes.read_sha256
    monkeypatch.setattr(file_hashes, "read_sha256", lambda f: reads.append(1) or real(f))
    open_engines(sdxl_copy, tiny_sdxl, plan)
    assert reads == []  # a second start reads no engine file to verify it
    path = sdxl_copy / entry.files[0].path
    data = path.read_bytes()
    path.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])  # same size, one bit
    with pytest.raises(CorruptEngineError, match=str(path)):
        open_engines(sdxl_copy, tiny_sdxl, plan)


@pytest.mark.slow
def test_aoti_packages_run_without_the_torch_modules(sd15_aoti):
    from tests.conftest import AOTI_STAGES

    tiny_sd15 = load_model("tiny-sd15")  # not the session's: other tests change its modules in place
    plan = validate_plan(tiny_sd15.family, parse_stages(AOTI_STAGES))
    sel = select_engines(sd15_aoti, tiny_sd15.family, "random:0", plan, backend="aoti")
    assert sel.modules_served() == {"unet", "vae", "text_encoder"}
    bare = load_model("tiny-sd15", skip=sel.modules_served())
    nets, _ = open_engines(sd15_aoti, bare, plan, backend="aoti")
    full, _ = open_engines(sd15_aoti, tiny_sd15, plan, backend="aoti")
    opts = GenerationOptions("a red fox", seed=5)
    got = MegaFusionPipeline(bare, nets, "cpu").generate(plan, opts)
    want = MegaFusionPipeline(tiny_sd15, full, "cpu").generate(plan, opts)
    assert np.array_equal(got.image, want.image) and got.image.std() > 1


def test_a_build_remembers_its_files_so_the_first_run_reads_none(tiny_sd15, tmp_path, monkeypatch):
    monkeypatch.setattr(file_hashes, "RACY_NS", 200_000_000)  # the build waits this long before its last check
    report = build(tiny_sd15, tmp_path, stages="128x128:2", remember_hashes=True)
    assert {e.key.network for e, _ in report.built} == {"text_encoder", "unet", "vae_decoder"}
    reads = []
    real = file_hashes.read_sha256
    monkeypatch.setattr(file_hashes, "read_sha256", lambda f: reads.append(1) or real(f))
    open_engines(tmp_path, tiny_sd15, validate_plan(tiny_sd15.family, parse_stages("128x128:2")))
    assert reads == []
