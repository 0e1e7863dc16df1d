"""libmegafusion on `mf-build-engines --weights-apart` entries (issue #15): the UNet packages hold no weights; the
library reads each entry's weights.safetensors itself (cpp/src/lib/weight_file.cpp, aoti_weights.cpp), once per
file for the standard and dilated UNets that share it, and hands the tensors to the packages as user-managed
constants, as the Python runtime does (engine/aoti_shared.py).

Asserted: on the same token ids and seed, the image from the apart UNets equals the image from the session's UNets
with their weights inside (same model, same --dynamic ranges) within IMAGE_TOL (1 level of 255; measured here:
identical, pixel and latent relay), and equals Python's image on the same apart folder within IMAGE_TOL (measured:
at most 1 level, the relay's bicubic resize as in test_libmegafusion.py); both UNet packages get the tensors of one
read of the file (cpp/tests/test_aoti_weights.cpp); the weights come from the file (a weight changed there, its
manifest record updated, changes the image, as Python's does: what a LoRA-fused --weights-apart build writes is
served as written); a missing, damaged, foreign or incomplete weight file is one line naming the file and the
entry (MF_ERROR_ENGINE, exit status 3), and no image is written; so is an entry that lists no weight file.

The apart UNets are built once per session beside the tests (tests/conftest.py `sd15_apart_aoti`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megafusion.export.aoti_weights import read_weights, write_weights
from megafusion.runtime.pipeline import GenerationOptions

from ..conftest import AOTI_STAGES
from .test_libmegafusion import IMAGE_TOL, _cpp_image, _python_image, _run
from .test_libmegafusion_graphs import GRAPH_TOL, _cpp as _cpp_cuda

pytestmark = pytest.mark.slow

OPTS = GenerationOptions("a red cube", negative_prompt="blurry", seed=21)


def _unet_entries(folder: Path) -> list[dict]:
    return [e for e in json.loads((folder / "manifest.json").read_text())["entries"] if e["key"]["network"] == "unet"]


def _weight_files(folder: Path) -> list[Path]:
    return [folder / f["path"] for e in _unet_entries(folder) for f in e["files"]
            if f["path"].endswith("/weights.safetensors")]


def _replace_weights(folder: Path, write) -> None:
    """Every UNet weight file of `folder` rewritten by `write(path)`, its manifest record (sha256, size) updated:
    a file the manifest vouches for, so what the library makes of its contents is what is tested."""
    for p in _weight_files(folder):
        write(p)
    manifest = json.loads((folder / "manifest.json").read_text())
    for e in manifest["entries"]:
        for f in e["files"]:
            if f["path"].endswith("/weights.safetensors"):
                data = (folder / f["path"]).read_bytes()
                f["sha256"], f["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def drop_inside_unets(folder: Path) -> None:
    """Leaves `folder` with its --weights-apart UNets only (the packages with their weights inside dropped)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    inside = [e for e in manifest["entries"] if e["key"]["network"] == "unet" and "constants" not in e["key"]]
    manifest["entries"] = [e for e in manifest["entries"] if e not in inside]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for e in inside:
        shutil.rmtree(folder / Path(e["files"][0]["path"]).parent)


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "engines"
    shutil.copytree(src, dst)
    return dst


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_apart_unets_give_the_inside_image_and_pythons(cpp_build, sd15_aoti, sd15_apart_aoti, tiny_sd15, tmp_path):
    unets = _unet_entries(sd15_apart_aoti)
    assert sorted(e["key"]["variant"] for e in unets) == ["dilated", "standard"]
    assert all(e["key"].get("constants") == "apart" for e in unets)  # the only UNets there: no inside one to run
    files = _weight_files(sd15_apart_aoti)
    assert len(files) == 2 and files[0].read_bytes() == files[1].read_bytes()  # one file's tensors, shared

    apart = _cpp_image(cpp_build, sd15_apart_aoti, "tiny-sd15", AOTI_STAGES, OPTS, tmp_path)
    inside = _cpp_image(cpp_build, sd15_aoti, "tiny-sd15", AOTI_STAGES, OPTS, tmp_path)
    python = _python_image(tiny_sd15, sd15_apart_aoti, AOTI_STAGES, OPTS)
    assert apart.std() > 5  # a real image, not two blank ones agreeing
    assert _max_diff(apart, inside) <= IMAGE_TOL
    assert _max_diff(apart, python) <= IMAGE_TOL


def test_one_read_shared_by_both_unets(cpp_build, sd15_apart_aoti):
    """cpp/tests/test_aoti_weights.cpp on the folder: both UNet packages get the tensors of one read of the file."""
    r = _run([cpp_build / "cpp" / "megafusion_aoti_weights_test", sd15_apart_aoti])
    assert r.returncode == 0 and "passed 0 failures" in r.stdout, r.stdout + r.stderr
    assert "ok   two packages of one file read it once" in r.stdout


def test_the_weights_come_from_the_file(cpp_build, sd15_apart_aoti, tiny_sd15, tmp_path):
    folder = _copy(sd15_apart_aoti, tmp_path)
    before = _cpp_image(cpp_build, folder, "tiny-sd15", AOTI_STAGES, OPTS, tmp_path)

    def scaled(p: Path) -> None:
        tensors = read_weights(p, "cpu")
        name = next(n for n in sorted(tensors) if n.endswith("conv_in.weight"))
        tensors[name] = tensors[name] * 1.5
        write_weights(tensors, p)

    _replace_weights(folder, scaled)
    after = _cpp_image(cpp_build, folder, "tiny-sd15", AOTI_STAGES, OPTS, tmp_path)
    assert _max_diff(after, before) > 10
    assert _max_diff(after, _python_image(tiny_sd15, folder, AOTI_STAGES, OPTS)) <= IMAGE_TOL


def _refusal(cpp_build: Path, folder: Path, tmp: Path) -> str:
    from megafusion.runtime.tokens import format_ids, load_tokenizers

    ids = tmp / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), OPTS.prompt, OPTS.negative_prompt))
    png = tmp / "never.png"
    r = _run([cpp_build / "cpp" / "mf-generate-cpp", "--engines", folder, "--model", "tiny-sd15", "--ids", ids,
              "--stages", AOTI_STAGES, "--output", png])
    assert r.returncode == 3, r.stdout + r.stderr  # MF_ERROR_ENGINE
    assert r.stderr.count("\n") == 1, r.stderr
    assert not png.exists()
    return r.stderr


def _foreign(p: Path) -> None:  # a plain safetensors file: no megafusion metadata
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(p))


def _incomplete(p: Path) -> None:
    tensors = read_weights(p, "cpu")
    del tensors[sorted(tensors)[0]]
    write_weights(tensors, p)


@pytest.mark.parametrize("damage,said", [
    ("missing", "weights.safetensors is missing (unet ("),
    ("flipped", "weights.safetensors does not match its sha256 in the manifest (unet ("),
    ("foreign", "(unet (standard) fp32 aoti, entry {digest}) is not a megafusion weight file of format 1 (found none); "
                "rebuild the entry with mf-build-engines --weights-apart --force"),
    ("incomplete", "(unet (standard) fp32 aoti, entry {digest}) lacks 1 of the package's constants (first: {first}); "
                   "rebuild the entry with mf-build-engines --weights-apart --force"),
    ("unlisted", "unet (standard) fp32 aoti, entry {digest} in {folder} was built with --weights-apart but lists no "
                 "weights.safetensors; rebuild the entry with mf-build-engines --weights-apart --force"),
], ids=["missing", "flipped", "foreign", "incomplete", "unlisted"])
def test_a_bad_weight_file_is_one_line(cpp_build, sd15_apart_aoti, tmp_path, damage, said):
    folder = _copy(sd15_apart_aoti, tmp_path)
    first = sorted(read_weights(_weight_files(folder)[0], "cpu"))[0]
    if damage == "missing":
        for p in _weight_files(folder):
            p.unlink()
    elif damage == "flipped":
        for p in _weight_files(folder):
            data = bytearray(p.read_bytes())
            data[-1] ^= 0xFF
            p.write_bytes(bytes(data))
    elif damage == "unlisted":  # the manifest names no weight file (the entry's digest covers its key only)
        manifest = json.loads((folder / "manifest.json").read_text())
        for e in manifest["entries"]:
            e["files"] = [f for f in e["files"] if not f["path"].endswith("/weights.safetensors")]
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    else:
        _replace_weights(folder, _foreign if damage == "foreign" else _incomplete)
    err = _refusal(cpp_build, folder, tmp_path)
    standard = next(e for e in _unet_entries(folder) if e["key"]["variant"] == "standard")
    assert said.format(digest=standard["digest"][:16], first=first, folder=folder) in err, err
    if damage in ("foreign", "incomplete"):
        assert f"weight file {folder}/" in err, err


@pytest.mark.gpu
def test_apart_unets_on_cuda_give_the_inside_image(cuda_build, tmp_path_factory, tmp_path):
    """On the GPU (fp16 static packages, CUDA graphs on): the apart UNets' image within GRAPH_TOL (2 levels) of the
    inside UNets', each run capturing its stage graphs and replaying them."""
    from megafusion.cli.build_engines import main as build_main

    inside = tmp_path_factory.mktemp("apart-cuda") / "inside"
    base = ["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti", "--device", "cuda"]
    assert build_main([*base, "--output", str(inside)]) == 0
    apart = inside.parent / "apart"
    shutil.copytree(inside, apart)
    assert build_main([*base, "--networks", "unet", "--weights-apart", "--output", str(apart)]) == 0
    drop_inside_unets(apart)
    assert all(e["key"].get("constants") == "apart" for e in _unet_entries(apart))
    got, counters = _cpp_cuda(cuda_build, apart, OPTS, tmp_path)
    want, counters_inside = _cpp_cuda(cuda_build, inside, OPTS, tmp_path)
    assert counters[0] == "on" and counters[1] >= 1 and counters[2] > 0 and counters == counters_inside
    assert want.std() > 5 and _max_diff(got, want) <= GRAPH_TOL
