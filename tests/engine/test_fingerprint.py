"""Weights fingerprints without hashing tensors (engine/fingerprint.py, engine/file_hashes.py): a saved folder's
fingerprint is stable across processes, follows its files, and a remembered hash reads no file again; random
weights are fingerprinted by their recipe; weights changed in place (a fused LoRA) get their own key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from megafusion.core.loading import WeightsOrigin, load_model
from megafusion.engine import file_hashes
from megafusion.engine.cache import EngineError, weights_fingerprint
from megafusion.engine.file_hashes import FileHashes
from megafusion.engine.fingerprint import (WEIGHTS_SCHEME, folder_fingerprint, loaded_fingerprint, lora_fingerprint,
                                           module_fingerprint, network_fingerprint, origin_fingerprint, scheme_of)

from tests.core.test_loading import _save

QUICK_NS = 50_000_000
"""A racy window for tests (the default is 2 s): files older than this when hashed are remembered."""


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory, tiny_sd15):
    root = tmp_path_factory.mktemp("sd15-folder")
    _save(tiny_sd15, root)
    return root


def _unet_file(root):
    return root / "unet" / "diffusion_pytorch_model.safetensors"


def _count_reads(monkeypatch) -> list[int]:
    reads = []
    real = file_hashes.read_sha256

    def counting(f):
        reads.append(1)
        return real(f)

    monkeypatch.setattr(file_hashes, "read_sha256", counting)
    return reads


def test_folder_fingerprint_is_stable_across_processes(sd15_folder):
    origin = WeightsOrigin("files", folder=str(sd15_folder / "unet"))
    here = origin_fingerprint(origin, FileHashes(None))
    code = ("import sys; from megafusion.core.loading import WeightsOrigin; "
            "from megafusion.engine.file_hashes import FileHashes; "
            "from megafusion.engine.fingerprint import origin_fingerprint; "
            "print(origin_fingerprint(WeightsOrigin('files', folder=sys.argv[1]), FileHashes(None)))")
    there = subprocess.run([sys.executable, "-c", code, str(sd15_folder / "unet")], capture_output=True, text=True,
                           check=True, env=os.environ).stdout.strip()
    assert here == there and here.startswith(f"mf{WEIGHTS_SCHEME}:files:") and scheme_of(here) == WEIGHTS_SCHEME
    loaded = load_model("tiny-sd15", model_path=str(sd15_folder))
    assert network_fingerprint(loaded, "unet") == here  # what a loaded bundle says: from its files
    assert network_fingerprint(loaded, "vae_decoder") == network_fingerprint(loaded, "vae_encoder") != here


def test_fingerprint_follows_the_files_touched_or_rewritten(sd15_folder, tmp_path):
    import shutil

    root = tmp_path / "m"
    shutil.copytree(sd15_folder, root)
    hashes = FileHashes(tmp_path / "hashes.json")
    origin = WeightsOrigin("files", folder=str(root / "unet"))
    before = origin_fingerprint(origin, hashes)
    hashes.save()
    os.utime(_unet_file(root), ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: rehashed, same bytes
    assert origin_fingerprint(origin, FileHashes(tmp_path / "hashes.json")) == before
    data = _unet_file(root).read_bytes()
    _unet_file(root).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # rewritten: one bit of the last weight
    assert origin_fingerprint(origin, FileHashes(tmp_path / "hashes.json")) != before
    (root / "unet" / "config.json").write_text(json.dumps({**json.loads((root / "unet" / "config.json").read_text()),
                                                           "sample_size": 32}))
    changed = origin_fingerprint(origin, FileHashes(tmp_path / "hashes.json"))
    assert changed != before  # the config is part of the component


def test_remembered_hashes_read_no_weight_bytes(sd15_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(file_hashes, "RACY_NS", QUICK_NS)
    time.sleep(2 * QUICK_NS / 1e9)  # the folder's files are now older than the racy window
    reads = _count_reads(monkeypatch)
    first = FileHashes(tmp_path / "hashes.json")
    loaded = load_model("tiny-sd15", model_path=str(sd15_folder))
    want = {n: network_fingerprint(loaded, n, first) for n in ("unet", "vae_decoder", "text_encoder")}
    first.save()
    assert first.hashed == len(reads) > 0
    reads.clear()
    second = FileHashes(tmp_path / "hashes.json")  # a fresh start: records read back from the file
    assert {n: network_fingerprint(loaded, n, second) for n in want} == want
    assert reads == [] and second.hashed == 0


def test_just_written_files_are_hashed_again(tmp_path, monkeypatch):
    """Racy records: a file changed within the window before its hash is not remembered (it could change again
    within one tick of its file times)."""
    reads = _count_reads(monkeypatch)
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    first = FileHashes(tmp_path / "hashes.json")
    digest = first.sha256(f)
    first.save()
    f.write_bytes(b"b" * 100)  # at once: possibly the same file times
    assert FileHashes(tmp_path / "hashes.json").sha256(f) != digest
    assert len(reads) == 2


def test_random_fingerprint_follows_seed_and_needs_no_weights():
    a, b = load_model("tiny-sdxl", seed=0), load_model("tiny-sdxl", seed=1)
    prints = {network_fingerprint(m, n) for m in (a, b) for n in ("unet", "vae_decoder", "text_encoder_2")}
    assert len(prints) == 6 and all(p.startswith(f"mf{WEIGHTS_SCHEME}:random:") for p in prints)
    empty = load_model("tiny-sdxl", seed=0, skip=frozenset({"unet", "vae", "text_encoder", "text_encoder_2"}))
    assert all(t.device.type == "meta" for t in empty.unet.parameters())
    assert network_fingerprint(empty, "unet") == network_fingerprint(a, "unet")
    # A real-size SDXL, not materialised: its fingerprint comes from the recipe alone.
    sdxl = load_model("sdxl", random_weights=True, skip=frozenset({"unet", "vae", "text_encoder", "text_encoder_2"}))
    assert sum(p.numel() for p in sdxl.unet.parameters()) > 2e9
    assert network_fingerprint(sdxl, "unet").startswith(f"mf{WEIGHTS_SCHEME}:random:")


def test_weights_changed_in_place_get_their_own_fingerprint(tmp_path):
    from tests.core.test_lora import _random_lora, save_diffusers

    from megafusion.core.lora import LoraSpec, fuse_loras

    bundle = load_model("tiny-sd15")
    base = network_fingerprint(bundle, "unet")
    path = save_diffusers(_random_lora(bundle, seed=2), tmp_path / "l.safetensors")
    fuse_loras(bundle, [LoraSpec(path, 0.5)])
    fused = network_fingerprint(bundle, "unet")
    assert fused != base and fused == f"mf{WEIGHTS_SCHEME}:tensors:{weights_fingerprint(bundle.unet)}"
    assert network_fingerprint(bundle, "vae_decoder") == network_fingerprint(load_model("tiny-sd15"), "vae_decoder")
    prints = {lora_fingerprint(base, loras) for loras in ([], [(path, 0.5)], [(path, 0.7)], [(path, 0.5), (path, 0.5)])}
    assert len(prints) == 4
    empty = load_model("tiny-sd15", skip=frozenset({"unet"}))
    with torch.no_grad():
        next(empty.unet.parameters()).add_(1.0)  # meta: no values, yet changed since loading
    with pytest.raises(EngineError, match="unet: the module was built without weights"):
        network_fingerprint(empty, "unet")


def test_controlnet_read_from_a_folder_is_keyed_by_its_files(tiny_sd15, tmp_path):
    """A ControlNet loaded from a folder has the folder's `files` fingerprint, which mf-serve computes without
    loading it: a copy of the folder or another dtype gives the same, other weights another, and a change in place
    its tensors'."""
    import shutil

    from tests.runtime.test_controlnet import save_tiny_controlnet

    from megafusion.runtime.controlnet import load_controlnet

    a = save_tiny_controlnet(tiny_sd15.unet, tmp_path / "a", 1)
    b = save_tiny_controlnet(tiny_sd15.unet, tmp_path / "b", 2)
    shutil.copytree(a, tmp_path / "copy")
    cn = load_controlnet(a, tiny_sd15.unet, "cpu", torch.float32)
    fp = loaded_fingerprint(cn)
    assert fp.startswith(f"mf{WEIGHTS_SCHEME}:files:")
    assert fp == folder_fingerprint(a) == folder_fingerprint(tmp_path / "copy")
    assert loaded_fingerprint(load_controlnet(a, tiny_sd15.unet, "cpu", torch.float16)) == fp
    assert folder_fingerprint(b) != fp
    with torch.no_grad():
        next(cn.parameters()).add_(1.0)
    assert loaded_fingerprint(cn) == module_fingerprint(cn) != fp


@pytest.mark.gpu
def test_random_weights_drawn_on_the_gpu_are_other_weights_and_another_fingerprint():
    cpu, gpu = load_model("tiny-sdxl"), load_model("tiny-sdxl", device="cuda")
    assert not torch.equal(next(cpu.unet.parameters()), next(gpu.unet.parameters()).cpu())  # other generators
    assert network_fingerprint(cpu, "unet") != network_fingerprint(gpu, "unet")
    assert network_fingerprint(gpu, "unet") == network_fingerprint(load_model("tiny-sdxl", device="cuda"), "unet")
