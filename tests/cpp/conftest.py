"""Fixtures of the C API tests that go through ctypes (tests/cpp/flow_capi.py)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.cli import generate as gen_cli
from megafusion.runtime.tokens import format_ids, load_tokenizers

from ..conftest import AOTI_STAGES, IP_SCALE
from .flow_capi import Library

ROOT = Path(__file__).resolve().parents[2]

PROMPT, NEGATIVE, SEED = "a red cube", "blurry", 3
"""The IP-Adapter C API tests' generation (`ip_case`)."""


@pytest.fixture(scope="module")
def lib(cpp_build) -> Library:
    """libmegafusion of the session's CMake build (tests/conftest.py `cpp_build`), loaded through ctypes."""
    return Library(next(cpp_build.rglob("libmegafusion.so")))


@pytest.fixture(scope="session")
def ip_case(sd15_ip_aoti, tmp_path_factory) -> dict:
    """The session's IP-Adapter case on `sd15_ip_aoti`: the reference image (ref.png; `ref` its pixels), its torch
    encoder's embeddings as .npy and raw float32, the ids file and Python's IP image (mf-generate --engines, whose
    embeddings come from the folder's image encoder package), shared by tests/cpp/test_libmegafusion_ip*.py."""
    import torch

    from megafusion.runtime.ipadapter import encode_ip_image, load_image_encoder

    engines, ip, encoder = sd15_ip_aoti
    tmp = tmp_path_factory.mktemp("cpp-ip")
    ref = tmp / "ref.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(ref)
    enc, proc = load_image_encoder(encoder, "cpu", torch.float32)
    embeds = encode_ip_image(enc, proc, Image.open(ref).convert("RGB"), "cpu").reshape(-1).numpy()
    np.save(tmp / "e.npy", embeds.astype("<f4"))
    (tmp / "e.f32").write_bytes(embeds.astype("<f4").tobytes())
    (tmp / "ids.txt").write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), PROMPT, NEGATIVE))
    py = tmp / "py.png"
    assert gen_cli.main(["--model", "tiny-sd15", "--engines", str(engines), "--stages", AOTI_STAGES, "--prompt",
                         PROMPT, "--negative-prompt", NEGATIVE, "--seed", str(SEED), "--device", "cpu",
                         "--no-progress", "--ip-adapter", str(ip), "--ip-adapter-scale", str(IP_SCALE),
                         "--ip-adapter-image", str(ref), "--ip-adapter-encoder", str(encoder), "--output",
                         str(py)]) == 0
    return {"engines": engines, "ip": ip, "encoder": encoder, "tmp": tmp, "embeds": embeds,
            "ref": np.asarray(Image.open(ref).convert("RGB")), "py": np.asarray(Image.open(py).convert("RGB"))}


@pytest.fixture(scope="session")
def cuda_build(tmp_path_factory) -> Path:
    """libmegafusion built with CUDA, once per session: each GPU test module rebuilt it (and the packages below)
    when these were module fixtures, minutes per module on the lent GPU."""
    cmake, nvcc = shutil.which("cmake"), shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if cmake is None or not Path(nvcc).exists():
        pytest.skip("cmake or nvcc is not installed")
    build = tmp_path_factory.mktemp("cpp-build-cuda")
    cfg = _quiet([cmake, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_TESTING=OFF",
                f"-DPython3_EXECUTABLE={sys.executable}", f"-DCMAKE_CUDA_COMPILER={nvcc}"])
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    b = _quiet([cmake, "--build", build, "--target", "mf-generate-cpp", "-j8"])
    assert b.returncode == 0, b.stdout[-4000:] + b.stderr[-2000:]
    return build


@pytest.fixture(scope="session")
def sd15_aoti_cuda(tmp_path_factory) -> Path:
    from megafusion.cli.build_engines import main as build_main

    out = tmp_path_factory.mktemp("engines-aoti-cuda")
    assert build_main(["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti", "--device", "cuda",
                       "--output", str(out)]) == 0
    return out


def _quiet(cmd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
