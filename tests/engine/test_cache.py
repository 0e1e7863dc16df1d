"""Engine cache: keys, manifest and file verification, atomic commits, interrupted builds."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from megafusion.engine import onnx_build
from megafusion.engine.backend import get_backend
from megafusion.engine.cache import (CorruptEngineError, CorruptManifestError, EngineCache, EngineKey,
                                     StaleEngineError, weights_fingerprint)
from megafusion.engine.load import CoverageError, open_engines
from megafusion.core.families import get_family
from megafusion.core.plan import Stage, parse_stages, validate_plan
from megafusion.core.specs import plan_requirements

from tests.engines import STAGES, build

FAM = get_family("tiny-sdxl")


def base_key(**change) -> EngineKey:
    plan = validate_plan(FAM, [Stage(128, 128, 2), Stage(256, 256, 2)])
    r = next(r for r in plan_requirements(FAM, plan) if r.spec.name == "unet-standard-fp32")
    key = EngineKey("tiny-sdxl", "ab" * 32, "unet", "standard", 1, "fp32", r.profiles, "onnxruntime", "1.32.0", "cpu")
    return dataclasses.replace(key, **change)


def other_profiles():
    plan = validate_plan(FAM, [Stage(128, 160, 2)])  # one side one multiple wider
    return next(r for r in plan_requirements(FAM, plan) if r.spec.name == "unet-standard-fp32").profiles


def test_key_is_stable_and_changes_with_every_field():
    k = base_key()
    assert k.digest() == base_key().digest() and len(k.digest()) == 64
    variants = [base_key(variant="dilated", dilation=2), base_key(profiles=other_profiles()),
                base_key(precision="fp16"), base_key(weights="cd" * 32), base_key(backend_version="1.31.1"),
                base_key(device="NVIDIA H100 80GB HBM3"), base_key(backend="tensorrt"), base_key(model="sdxl")]
    digests = {v.digest() for v in variants} | {k.digest()}
    assert len(digests) == len(variants) + 1
    assert EngineKey.from_json(json.loads(json.dumps(k.to_json()))) == k


def test_ort_optimize_is_in_the_key_and_old_keys_keep_their_digest(tmp_path):
    import hashlib

    plain, cpu, cuda = base_key(), base_key(ort_optimize="cpu"), base_key(ort_optimize="cuda")
    assert len({plain.digest(), cpu.digest(), cuda.digest()}) == 3
    assert EngineKey.from_json(json.loads(json.dumps(cuda.to_json()))) == cuda
    old = plain.to_json()  # a key as written before the field existed: no "ort_optimize" at all
    assert "ort_optimize" not in old
    old_digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert EngineKey.from_json(old).ort_optimize == "none" and EngineKey.from_json(old).digest() == old_digest
    cache = EngineCache(tmp_path)
    entry = _commit(cache, plain)
    cache.manifest_path.write_text(json.dumps({"format": 1, "entries": [
        {"digest": old_digest, "key": old, "created": entry.created,
         "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in entry.files]}]}))
    assert cache.lookup(plain) == entry and cache.lookup(cpu) is None  # loads; an optimized build misses it
    assert "ORT-fused for cuda" in cuda.describe() and "ORT" not in plain.describe()


def test_weights_fingerprint_sees_one_changed_weight():
    from megafusion.core.loading import load_model

    vae = load_model("tiny-sd15").vae  # private: an in-place write drops a bundle's weights origin for good
    before = weights_fingerprint(vae)
    assert weights_fingerprint(vae) == before
    p = next(vae.parameters())
    with torch.no_grad():
        p.view(-1)[0] += 1e-3
        try:
            assert weights_fingerprint(vae) != before
        finally:
            p.view(-1)[0] -= 1e-3


def _commit(cache: EngineCache, key: EngineKey, payload: bytes = b"engine bytes" * 100):
    with cache.staging(key) as tmp:
        (tmp / "model.onnx").write_bytes(payload)
        return cache.commit(key, tmp)


def test_commit_lookup_and_verify(tmp_path):
    cache = EngineCache(tmp_path)
    entry = _commit(cache, base_key())
    assert cache.lookup(base_key()) == entry
    assert cache.lookup(base_key(precision="fp16")) is None
    rec = entry.files[0]
    assert rec.size == 1200 and (tmp_path / rec.path).is_file()
    assert not list(tmp_path.glob(".staging-*")) and not list(tmp_path.glob(".manifest*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong-format", "edited-key"])
def test_corrupt_manifest_is_a_clear_error_naming_it(tmp_path, damage):
    cache = EngineCache(tmp_path)
    _commit(cache, base_key())
    text = cache.manifest_path.read_text()
    if damage == "truncate":
        cache.manifest_path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        cache.manifest_path.write_bytes(b"\xff\x00not json")
    elif damage == "empty":
        cache.manifest_path.write_text("")
    elif damage == "wrong-format":
        cache.manifest_path.write_text(json.dumps({"format": 99, "entries": []}))
    else:
        cache.manifest_path.write_text(text.replace('"fp32"', '"fp16"'))
    with pytest.raises(CorruptManifestError, match=str(cache.manifest_path)):
        cache.entries()
    with pytest.raises(CorruptManifestError, match=str(cache.manifest_path)):
        cache.lookup(base_key())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_engine_file_is_refused_at_run_time(tiny_sdxl, sdxl_copy, damage):
    cache = EngineCache(sdxl_copy)
    entry = next(e for e in cache.entries().values() if e.key.variant == "dilated")
    path = sdxl_copy / entry.files[0].path
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "flip":
        path.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    else:
        path.unlink()
    plan = validate_plan(tiny_sdxl.family, parse_stages(STAGES))
    with pytest.raises(CorruptEngineError, match=str(path)):
        open_engines(sdxl_copy, tiny_sdxl, plan)
    assert cache.lookup(entry.key) is None  # so a build rebuilds it


def test_build_rebuilds_only_the_corrupt_entry(tiny_sdxl, sdxl_copy):
    cache = EngineCache(sdxl_copy)
    entry = next(e for e in cache.entries().values() if e.key.network == "vae_encoder")
    (sdxl_copy / entry.files[0].path).write_bytes(b"torn")
    report = build(tiny_sdxl, sdxl_copy)
    assert [e.key.network for e, _ in report.built] == ["vae_encoder"] and len(report.skipped) == 5
    cache.verify(cache.lookup(entry.key))


def test_stale_entries_are_refused_at_run_time(tiny_sdxl, sdxl_copy, monkeypatch):
    from megafusion.core.loading import load_model

    plan = validate_plan(tiny_sdxl.family, parse_stages(STAGES))
    with pytest.raises(StaleEngineError, match="other weights.*mf-build-engines --model tiny-sdxl"):
        open_engines(sdxl_copy, load_model("tiny-sdxl", seed=1), plan)
    ort = get_backend("onnxruntime")
    monkeypatch.setattr(type(ort), "version", lambda self: "0.0.1")
    with pytest.raises(StaleEngineError, match=r"onnxruntime 1\.\d+.*installed: 0\.0\.1"):
        open_engines(sdxl_copy, tiny_sdxl, plan)
    monkeypatch.undo()
    monkeypatch.setattr("megafusion.engine.load.device_name", lambda d: "NVIDIA H100")
    with pytest.raises(StaleEngineError, match="device 'cpu'"):
        open_engines(sdxl_copy, tiny_sdxl, plan)


def test_build_interrupted_midway_leaves_nothing_accepted(tiny_sdxl, tmp_path, monkeypatch):
    real_export = onnx_build.export_onnx

    def export_then_die(bundle, spec, path, **kw):
        if spec.network == "unet":
            path.write_bytes(b"half an onnx file")  # what a killed export leaves behind
            raise KeyboardInterrupt("killed mid-export")
        return real_export(bundle, spec, path, **kw)

    monkeypatch.setattr(onnx_build, "export_onnx", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_sdxl, tmp_path)
    cache = EngineCache(tmp_path)
    assert sorted(e.key.network for e in cache.entries().values()) == ["text_encoder", "text_encoder_2"]
    assert not list(tmp_path.glob(".staging-*")) and not list(tmp_path.glob("unet-*"))
    plan = validate_plan(tiny_sdxl.family, parse_stages(STAGES))
    with pytest.raises(CoverageError, match="no tiny-sdxl engines.*build them with: mf-build-engines"):
        open_engines(tmp_path, tiny_sdxl, plan)


def test_kill_between_folder_move_and_manifest_write_leaves_nothing_accepted(tmp_path, monkeypatch):
    cache = EngineCache(tmp_path)
    real_replace = os.replace

    def die_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt("killed before the manifest was replaced")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        _commit(cache, base_key())
    monkeypatch.setattr(os, "replace", real_replace)
    assert cache.entry_dir(base_key()).is_dir()  # the files made it ...
    assert cache.entries() == {} and cache.lookup(base_key()) is None  # ... but nothing lists them
    entry = _commit(cache, base_key(), b"rebuilt")  # a later build replaces the orphan folder
    assert cache.lookup(base_key()) == entry and entry.files[0].size == len(b"rebuilt")


def test_leftover_staging_is_ignored_and_cleaned(tmp_path):
    cache = EngineCache(tmp_path)
    left = tmp_path / ".staging-deadbeef-1-0"
    left.mkdir()
    (left / "model.onnx").write_bytes(b"partial")
    assert cache.entries() == {}
    assert cache.remove_stale_staging(older_than_s=0) == 1 and not left.exists()


def test_staging_of_a_dead_build_is_removed_and_a_live_ones_kept(tmp_path):
    """A build killed with SIGKILL leaves `.staging-<digest16>-<pid>-<id>`; the next build removes it at once
    (not after an hour: for SDXL it can hold a 9.8 GB export) and keeps the folder of a process still running."""
    import subprocess
    import sys

    cache = EngineCache(tmp_path)
    digest = base_key().digest()[:16]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now free: the "killed build"
    dead = tmp_path / f".staging-{digest}-{child.pid}-0123abcd"
    live = tmp_path / f".staging-{digest}-{os.getpid()}-4567cdef"
    for p in (dead, live):
        p.mkdir()
        (p / "model.onnx").write_bytes(b"half an export")
    assert cache.remove_stale_staging() == 1
    assert not dead.exists() and (live / "model.onnx").is_file()
