"""Engine folders are confined: an entry's files lie inside the folder, as regular files reached without links;
anything else is refused naming the file and the entry, and a build rebuilds it without writing outside."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from megafusion.engine.cache import CorruptEngineError, CorruptManifestError, EngineCache
from megafusion.engine.model_facts import read_models

from tests.engine.test_cache import _commit, base_key

PAYLOAD = b"engine bytes" * 100


def _relist(cache: EngineCache, path: str) -> None:
    """Rewrites the manifest so its only entry's file is recorded at `path` (hash and size unchanged)."""
    data = json.loads(cache.manifest_path.read_text())
    data["entries"][0]["files"][0]["path"] = path
    cache.manifest_path.write_text(json.dumps(data))


@pytest.fixture
def folder(tmp_path):
    """An engine folder with one committed entry, and a copy of its file outside the folder."""
    root = tmp_path / "engines"
    cache = EngineCache(root)
    entry = _commit(cache, base_key(), PAYLOAD)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(PAYLOAD)  # the same bytes: size and sha256 match the record
    return cache, entry, outside


def _refused(cache, entry, *needles):
    with pytest.raises(CorruptEngineError) as e:
        cache.verify(entry if entry is not None else next(iter(cache.entries().values())))
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert f"entry {base_key().digest()[:16]}" in str(e.value)
    assert cache.lookup(base_key()) is None  # so a build rebuilds it
    return str(e.value)


@pytest.mark.parametrize("path, why", [("../outside.onnx", "has a '..' component"),
                                       ("ABS", "is absolute"),
                                       ("x/../../outside.onnx", "has a '..' component"),
                                       ("./x//model.onnx", "is not a normalized relative path")])
def test_paths_leaving_the_folder_are_refused(folder, path, why):
    cache, _, outside = folder
    path = str(outside) if path == "ABS" else path
    _relist(cache, path)
    _refused(cache, None, f"lists file {path!r}, which {why}", "engine files must lie inside the engine folder")


def test_symlinked_file_is_refused_even_with_the_right_bytes(folder):
    cache, entry, outside = folder
    p = cache.root / entry.files[0].path
    p.unlink()
    p.symlink_to(outside)
    msg = _refused(cache, entry, f"engine file {p} is a symbolic link")
    assert msg.startswith(f"engine file {p} is a symbolic link (unet (standard) fp32 onnxruntime, entry ")


def test_symlink_to_a_system_file_is_refused_as_a_link(folder):
    cache, entry, _ = folder
    p = cache.root / entry.files[0].path
    p.unlink()
    p.symlink_to("/etc/passwd")
    _refused(cache, entry, f"engine file {p} is a symbolic link")


def test_symlinked_folder_component_is_refused_and_a_rebuild_writes_inside(folder, tmp_path):
    cache, entry, _ = folder
    entry_dir = cache.root / entry.files[0].path.split("/")[0]
    elsewhere = tmp_path / "elsewhere"
    shutil.move(entry_dir, elsewhere)
    entry_dir.symlink_to(elsewhere, target_is_directory=True)
    _refused(cache, entry, f": {entry_dir} is a symbolic link")
    rebuilt = _commit(cache, base_key(), b"rebuilt")
    assert not entry_dir.is_symlink() and entry_dir.is_dir()
    assert (elsewhere / "model.onnx").read_bytes() == PAYLOAD  # the link's target is untouched
    assert cache.lookup(base_key()) == rebuilt


def test_fifo_and_directory_are_not_regular_files(folder):
    cache, entry, _ = folder
    p = cache.root / entry.files[0].path
    p.unlink()
    os.mkfifo(p)
    _refused(cache, entry, f"engine file {p} is a FIFO, not a regular file")
    p.unlink()
    p.mkdir()
    _refused(cache, entry, f"engine file {p} is a directory, not a regular file")


def test_deeply_nested_manifest_is_a_corrupt_manifest(tmp_path):
    cache = EngineCache(tmp_path)
    cache.manifest_path.write_text("[" * 100_000)
    with pytest.raises(CorruptManifestError, match=str(cache.manifest_path)):
        cache.entries()
    (tmp_path / "models.json").write_text("[" * 100_000)
    with pytest.raises(CorruptManifestError, match=str(tmp_path / "models.json")):
        read_models(tmp_path)


def test_build_rebuilds_a_symlinked_entry_and_the_run_refuses_it_first(tiny_sdxl, sdxl_copy, tmp_path, capsys):
    from megafusion.cli import build_engines as build_cli
    from megafusion.cli import generate as gen_cli

    from tests.engines import STAGES

    cache = EngineCache(sdxl_copy)
    entry = next(e for e in cache.entries().values() if e.key.network == "text_encoder")
    p = sdxl_copy / entry.files[0].path
    outside = tmp_path / "outside.onnx"
    shutil.move(p, outside)
    p.symlink_to(outside)  # the very bytes the manifest records, through a link
    before = outside.read_bytes()
    gen = ["--model", "tiny-sdxl", "--stages", STAGES, "--prompt", "x", "--no-progress", "--engines", str(sdxl_copy),
           "--output", str(tmp_path / "o.png")]
    assert gen_cli.main(gen) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"engine file {p} is a symbolic link (text_encoder fp32 onnxruntime" in err
    assert build_cli.main(["--model", "tiny-sdxl", "--stages", STAGES, "--device", "cpu",
                           "--output", str(sdxl_copy)]) == 0
    assert "1 built, 5 up to date" in capsys.readouterr().out
    assert not p.is_symlink() and p.is_file() and outside.read_bytes() == before
    assert gen_cli.main(gen) == 0

