"""libmegafusion (cpp/): the C++ library, given the same AOTInductor engines, token ids and seed, produces the
Python runtime's image, within 1 level of 255. The arithmetic is the same op for op (float32 coefficients, CFG,
DDIM, noise from the same seeded CPU generator); the one difference is the relay's bicubic resize, the C++ core's
against torch's (within 1e-5, ctest core_matches_python). Bad calls through the C API return status codes and
messages (ctest c_api_bad_calls).

The library is built with CMake against the installed torch (about a minute); the tests skip, saying why, where
cmake or torch's CMake package is missing. tiny-sd15 runs in CI; tiny-sdxl (two text encoders, pooled embedding,
time ids, zero negative embeddings) needs its own packages, about 6 minutes of AOTInductor compiles on two
cores, so it runs with MEGAFUSION_TEST_SDXL_AOTI=1.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megafusion.engine.load import open_engines
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from megafusion.runtime.tokens import format_ids, load_tokenizers

from ..conftest import AOTI_STAGES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
IMAGE_TOL = 1
"""Largest allowed difference per channel, in levels of 255."""


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _cpp_image(build: Path, engines: Path, model: str, stages: str, opts: GenerationOptions, tmp: Path,
               *flags: str) -> np.ndarray:
    from PIL import Image

    ids = tmp / "ids.txt"
    ids.write_text(format_ids(model, load_tokenizers(model), opts.prompt, opts.negative_prompt))
    png = tmp / "cpp.png"
    r = _run([build / "cpp" / "mf-generate-cpp", "--engines", engines, "--model", model, "--ids", ids, "--stages",
              stages, "--seed", opts.seed, "--guidance", opts.guidance, "--relay", opts.relay, "--dilation",
              opts.dilation, "--output", png, *flags])
    assert r.returncode == 0, r.stderr
    return np.asarray(Image.open(png).convert("RGB"))


def _python_image(bundle, engines: Path, stages: str, opts: GenerationOptions) -> np.ndarray:
    plan = validate_plan(bundle.family, parse_stages(stages))
    nets, _ = open_engines(engines, bundle, plan, dilation=opts.dilation, relay=opts.relay)
    return MegaFusionPipeline(bundle, nets).generate(plan, opts).image


def _compare(cpp: np.ndarray, py: np.ndarray) -> None:
    assert cpp.shape == py.shape
    assert py.std() > 5  # a real image, not two blank ones agreeing
    diff = np.abs(cpp.astype(int) - py.astype(int))
    assert diff.max() <= IMAGE_TOL, (diff.max(), diff.mean())


@pytest.mark.parametrize("relay,negative,guidance", [("pixel", "blurry", 7.0), ("latent", "", 5.0),
                                                     ("pixel", "", 1.0)])
def test_cpp_image_equals_python_sd15(cpp_build, sd15_aoti, tiny_sd15, tmp_path, relay, negative, guidance):
    opts = GenerationOptions("a red cube", negative_prompt=negative, guidance=guidance, seed=11, relay=relay)
    _compare(_cpp_image(cpp_build, sd15_aoti, "tiny-sd15", AOTI_STAGES, opts, tmp_path),
             _python_image(tiny_sd15, sd15_aoti, AOTI_STAGES, opts))


def test_cpp_plain_steps_equal_python_sd15(cpp_build, sd15_aoti, tiny_sd15, tmp_path):
    # Graphs on (the default) runs the buffered step on the CPU; --no-graphs the plain step loop: both = Python.
    opts = GenerationOptions("a red cube", negative_prompt="blurry", seed=12)
    _compare(_cpp_image(cpp_build, sd15_aoti, "tiny-sd15", AOTI_STAGES, opts, tmp_path, "--no-graphs"),
             _python_image(tiny_sd15, sd15_aoti, AOTI_STAGES, opts))


def test_cpp_graph_counters_on_cpu(cpp_build, sd15_aoti, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), "a red cube", "blurry"))
    cmd = [cpp_build / "cpp" / "mf-generate-cpp", "--engines", sd15_aoti, "--model", "tiny-sd15", "--ids", ids,
           "--stages", AOTI_STAGES, "--output", tmp_path / "a.png"]
    on, off = _run(cmd), _run([*cmd, "--no-graphs"])
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert "graphs on, 0 captures, 0 replays" in on.stdout  # nothing is captured on the CPU
    assert "graphs off, 0 captures, 0 replays" in off.stdout


def test_progress_callback_on_the_unet_loop(lib, sd15_aoti):
    """The UNet families' loops call mf_inputs_set_progress's callback as the flow ones do
    (test_libmegafusion_flow.py): (1, T) .. (T, T) with graphs on (the buffered step on the CPU) and off, the image
    unchanged; a nonzero return in stage 2's first step (after the relay) ends with MF_ERROR_CANCELLED."""
    import ctypes

    from megafusion.runtime.conditioning import token_ids

    tok = load_tokenizers("tiny-sd15")[0]
    ids = [(ctypes.c_int32 * 77)(*(int(t) for t in token_ids(tok, text, "cpu")[0])) for text in ("a red cube", "")]
    pair = ctypes.POINTER(ctypes.c_int32) * 2
    fields = dict(prompt_ids=pair(ctypes.cast(ids[0], ctypes.POINTER(ctypes.c_int32))),
                  negative_ids=pair(ctypes.cast(ids[1], ctypes.POINTER(ctypes.c_int32))))
    total = sum(s.steps for s in parse_stages(AOTI_STAGES))
    rc, ctx = lib.open(sd15_aoti, "tiny-sd15")
    assert rc == 0, lib.error()
    try:
        rc, plain = lib.generate(ctx, AOTI_STAGES, 3, 7.0, {}, **fields)
        assert rc == 0 and plain.std() > 5, plain
        for graphs in (True, False):
            lib.set_graphs(ctx, graphs)
            seen = []
            rc, img = lib.generate(ctx, AOTI_STAGES, 3, 7.0, {}, progress=lambda s, t: seen.append((s, t)) or 0,
                                   **fields)
            assert rc == 0 and np.array_equal(img, plain), img
            assert seen == [(s, total) for s in range(1, total + 1)], (graphs, seen)
            rc, err = lib.generate(ctx, AOTI_STAGES, 3, 7.0, {}, progress=lambda s, t: int(s == 3), **fields)
            assert rc == 6 and err == f"cancelled by the progress callback after step 3 of {total}", (rc, err)
    finally:
        lib.lib.mf_context_destroy(ctx)


def test_example_prints_progress_and_stops_at_its_deadline(cpp_build, sd15_aoti, tmp_path):
    """mf-generate-cpp --progress prints each step through the callback; --deadline 0 stops the generation at its
    first step: exit status 6 (MF_ERROR_CANCELLED), one line, no PNG."""
    ids = tmp_path / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), "a red cube", "blurry"))
    cmd = [cpp_build / "cpp" / "mf-generate-cpp", "--engines", sd15_aoti, "--model", "tiny-sd15", "--ids", ids,
           "--stages", AOTI_STAGES]
    total = sum(s.steps for s in parse_stages(AOTI_STAGES))
    r = _run([*cmd, "--output", tmp_path / "a.png", "--progress"])
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("step ")] == \
        [f"step {s}/{total}" for s in range(1, total + 1)]
    r = _run([*cmd, "--output", tmp_path / "b.png", "--deadline", "0"])
    assert r.returncode == 6, r.stderr
    assert r.stderr.strip() == f"mf-generate-cpp: cancelled by the progress callback after step 1 of {total}"
    assert not (tmp_path / "b.png").exists()


FILES = re.compile(r"engine files verified: (\d+) hashed, (\d+) by file-hashes.json")


def test_cpp_verifies_built_files_by_remembered_hashes(cpp_build, sd15_aoti, tmp_path):
    """mf-build-engines remembers each file's sha256 with its stat (engine/file_hashes.py): libmegafusion takes
    the hash from that record instead of reading the file. A copy of the folder (new inodes and times, records
    keyed by the old paths) is read and hashed whole, and libmegafusion then keeps the records itself: its next
    start from the copy reads nothing."""
    ids = tmp_path / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), "a red cube", "blurry"))
    copy = tmp_path / "copy"
    shutil.copytree(sd15_aoti, copy)
    time.sleep(2.1)  # a file changed within 2 s of its hash is not remembered (file_hashes.RACY_NS)
    counts = []
    for folder in (sd15_aoti, copy, copy):
        r = _run([cpp_build / "cpp" / "mf-generate-cpp", "--engines", folder, "--model", "tiny-sd15", "--ids", ids,
                  "--stages", AOTI_STAGES, "--output", tmp_path / "a.png"])
        assert r.returncode == 0, r.stderr
        m = FILES.search(r.stdout)
        assert m is not None, r.stdout
        counts.append((int(m.group(1)), int(m.group(2))))
    (hashed, remembered), (copy_hashed, copy_remembered), again = counts
    assert hashed == 0 and remembered >= 3  # text encoder, UNets, VAE: none read
    assert copy_remembered == 0 and copy_hashed == remembered
    assert again == (0, remembered)
    from megafusion.engine.file_hashes import HASHES, FileHashes

    records = FileHashes(copy / HASHES)  # what libmegafusion kept, as Python reads it
    assert sum(records.lookup(p, p.stat()) is not None for p in copy.rglob("*") if p.is_file()) >= remembered


def test_cpp_refuses_size_no_package_covers(cpp_build, sd15_aoti, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), "a red cube", "blurry"))
    png = tmp_path / "never.png"
    r = _run([cpp_build / "cpp" / "mf-generate-cpp", "--engines", sd15_aoti, "--model", "tiny-sd15", "--ids", ids,
              "--stages", "128x128:2,384x384:2", "--output", png])
    assert r.returncode == 2, r.stdout + r.stderr  # MF_ERROR_UNSUPPORTED_SIZE
    assert r.stderr.count("\n") == 1, r.stderr
    assert "do not cover unet (dilated) fp32 aoti at 384x384" in r.stderr, r.stderr
    assert "they cover 128x128 to 256x256" in r.stderr and "mf-build-engines --model tiny-sd15 --stages " \
        f"128x128:2,384x384:2 --backend aoti --precision fp32 --device cpu --output {sd15_aoti}" in r.stderr, r.stderr
    assert not png.exists()


def test_another_seed_another_image(cpp_build, sd15_aoti, tmp_path):
    a = _cpp_image(cpp_build, sd15_aoti, "tiny-sd15", AOTI_STAGES, GenerationOptions("a red cube", seed=1), tmp_path)
    b = _cpp_image(cpp_build, sd15_aoti, "tiny-sd15", AOTI_STAGES, GenerationOptions("a red cube", seed=2), tmp_path)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 10


def test_c_api_bad_calls(cpp_build):
    r = _run(["ctest", "--test-dir", cpp_build, "-R", "c_api_bad_calls", "--output-on-failure"])
    assert r.returncode == 0, r.stdout[-4000:]
    assert "1 tests passed" in r.stdout or "100% tests passed" in r.stdout


@pytest.mark.skipif(os.environ.get("MEGAFUSION_TEST_SDXL_AOTI") != "1",
                    reason="builds tiny-sdxl AOTInductor packages (about 6 minutes); set MEGAFUSION_TEST_SDXL_AOTI=1")
@pytest.mark.parametrize("negative", ["", "blurry"])
def test_cpp_image_equals_python_sdxl(cpp_build, tiny_sdxl, tmp_path_factory, tmp_path, negative):
    from megafusion.cli.build_engines import main as build_main

    engines = tmp_path_factory.getbasetemp() / "engines-aoti-sdxl"
    if not (engines / "models.json").exists():
        assert build_main(["--model", "tiny-sdxl", "--stages", AOTI_STAGES, "--backend", "aoti", "--device", "cpu",
                           "--output", str(engines)]) == 0
    opts = GenerationOptions("a red cube", negative_prompt=negative, seed=5)
    _compare(_cpp_image(cpp_build, engines, "tiny-sdxl", AOTI_STAGES, opts, tmp_path),
             _python_image(tiny_sdxl, engines, AOTI_STAGES, opts))
