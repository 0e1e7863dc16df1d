"""libmegafusion on SD3 and FLUX (issue #17 item 4; cpp/src/lib/flow_context.cpp): from the folder
`mf-build-engines --model tiny-sd3|tiny-flux --backend aoti` writes (transformer, text encoder and VAE packages),
with token ids per encoder (mf_inputs_set_tokens), the C API gives `mf-generate --engines`' image within 1 level
of 255 on a 2-stage plan (CPU, fp32), both relays; bad input is one line naming it, before any network runs.

Called through ctypes (tests/cpp/flow_capi.py) on the session's libmegafusion (`cpp_build`). Each family's folder
takes 7-8 AOTInductor compiles (about 3 minutes on two cores), built once per module.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.cli import build_engines as build_cli
from megafusion.cli import generate as gen_cli
from megafusion.core.loading import load_model
from megafusion.runtime.flow_tokens import flow_token_ids

from tests.conftest import SD3_AOTI_STAGES
from .flow_capi import ids_text
from .test_libmegafusion import IMAGE_TOL

pytestmark = pytest.mark.slow

PROMPT, SEED = "a red fox", 3
# The plans run on the session's packages (tests/conftest.py flux_aoti / sd3_aoti): the same stage shapes
STAGES = {"tiny-flux": "128x128:2,160x160:2", "tiny-sd3": SD3_AOTI_STAGES}
SIZE = {"tiny-flux": (160, 160), "tiny-sd3": (160, 192)}  # (height, width) of the image
MF_ERROR_INVALID_ARGUMENT, MF_ERROR_UNSUPPORTED_SIZE, MF_ERROR_CANCELLED = 1, 2, 6


def _ids(model: str, text: str) -> dict[str, list[int]]:
    """The token ids mf-generate encodes, per encoder (runtime/flow_tokens.py)."""
    return flow_token_ids(load_model(model), text)


@pytest.fixture(scope="module")
def flow_folders(flux_aoti, sd3_aoti) -> dict[str, Path]:
    """The session's folders: mf-build-engines --backend aoti writes every network for these families."""
    return {"tiny-flux": flux_aoti[0], "tiny-sd3": sd3_aoti[0]}


def _python(model: str, folder: Path, tmp: Path, *flags) -> np.ndarray:
    out = tmp / "py.png"
    assert gen_cli.main(["--model", model, "--engines", str(folder), "--stages", STAGES[model], "--prompt", PROMPT,
                         "--seed", str(SEED), "--device", "cpu", "--no-progress", "--output", str(out),
                         *map(str, flags)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_flow_generation_equals_python(lib, flow_folders, tmp_path, model):
    fam = load_model(model).family
    folder = flow_folders[model]
    rc, ctx = lib.open(folder, model)
    assert rc == 0, lib.error()
    try:
        assert lib.lib.mf_num_text_encoders(ctx) == (3 if model == "tiny-sd3" else 2)
        neg = _ids(model, "") if fam.cfg else None  # SD3 encodes the empty negative prompt
        images = {}
        for relay in ("pixel", "latent"):
            rc, cpp = lib.generate(ctx, STAGES[model], SEED, fam.default_guidance, _ids(model, PROMPT), neg, relay)
            assert rc == 0, cpp
            py = _python(model, folder, tmp_path, "--relay", relay)
            assert cpp.shape == py.shape == (*SIZE[model], 3) and py.std() > 5  # a real image, not two blank ones
            diff = np.abs(cpp.astype(int) - py.astype(int))
            assert diff.max() <= IMAGE_TOL, (relay, diff.max(), diff.mean())
            images[relay] = cpp
        assert np.abs(images["pixel"].astype(int) - images["latent"].astype(int)).max() > 10
    finally:
        lib.lib.mf_context_destroy(ctx)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_progress_callback_counts_the_steps_and_stops_the_generation(lib, flow_folders, model):
    """mf_inputs_set_progress: the callback gets (1, T) .. (T, T) for a plan's T steps, in order, graphs on (the
    buffered step on the CPU) and off, and leaves the image as it is; a nonzero return stops the generation after
    that step with MF_ERROR_CANCELLED in one line, and the context then generates as before. SD3 too: its CFG
    batch is one step, counted once."""
    fam = load_model(model).family
    ids, neg = _ids(model, PROMPT), (_ids(model, "") if fam.cfg else None)
    args = (STAGES[model], SEED, fam.default_guidance, ids, neg)
    rc, ctx = lib.open(flow_folders[model], model)
    assert rc == 0, lib.error()
    total = sum(int(s.split(":")[1]) for s in STAGES[model].split(","))
    try:
        rc, plain = lib.generate(ctx, *args)
        assert rc == 0, plain
        for graphs in (True, False):
            lib.set_graphs(ctx, graphs)
            seen = []
            rc, img = lib.generate(ctx, *args, progress=lambda s, t: seen.append((s, t)) or 0)
            assert rc == 0, img
            assert seen == [(s, total) for s in range(1, total + 1)], (graphs, seen)
            assert np.array_equal(img, plain)
            seen.clear()
            rc, err = lib.generate(ctx, *args, progress=lambda s, t: seen.append((s, t)) or int(s == 3))
            assert rc == MF_ERROR_CANCELLED and err == f"cancelled by the progress callback after step 3 of {total}"
            assert seen == [(1, total), (2, total), (3, total)]  # stopped there: step 4 never ran
        rc, img = lib.generate(ctx, *args)
        assert rc == 0 and np.array_equal(img, plain)
    finally:
        lib.lib.mf_context_destroy(ctx)


def test_two_contexts_generate_at_once_on_two_threads(lib, flow_folders):
    """The header's promise to a server that runs one context per worker thread: distinct contexts are
    independent. Two tiny-flux contexts on one folder generate at the same time (ctypes releases the GIL in the
    call), each with its own seed and progress callback, and give the images each gives alone. Both are inside
    the library at once: each one's first callback waits for the other's (a library that ran one context at a time
    would leave that wait to time out, and the callback then stops its generation)."""
    import threading

    model, ids = "tiny-flux", _ids("tiny-flux", PROMPT)
    contexts = []
    for _ in range(2):
        rc, ctx = lib.open(flow_folders[model], model)
        assert rc == 0, lib.error()
        contexts.append(ctx)
    try:
        alone = {}
        for seed, ctx in zip((3, 4), contexts):
            rc, alone[seed] = lib.generate(ctx, STAGES[model], seed, 3.5, ids)
            assert rc == 0, alone[seed]
        assert not np.array_equal(alone[3], alone[4])
        together, steps, both_inside = {}, {3: [], 4: []}, threading.Barrier(2, timeout=120)

        def progress(seed, step):
            steps[seed].append(step)
            if step == 1:
                try:
                    both_inside.wait()
                except threading.BrokenBarrierError:
                    return 1
            return 0

        def work(seed, ctx):
            together[seed] = lib.generate(ctx, STAGES[model], seed, 3.5, ids,
                                          progress=lambda s, t: progress(seed, s))

        threads = [threading.Thread(target=work, args=(seed, ctx)) for seed, ctx in zip((3, 4), contexts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for seed in (3, 4):
            rc, image = together[seed]
            assert rc == 0 and np.array_equal(image, alone[seed]), (seed, image)
            assert steps[seed] == list(range(1, len(steps[seed]) + 1)) and steps[seed]
    finally:
        for ctx in contexts:
            lib.lib.mf_context_destroy(ctx)


def test_c_driver_gives_the_ctypes_image(lib, cpp_build, flow_folders, tmp_path):
    """cpp/tests/flow_run.c (no Python in its process: what ASan and compute-sanitizer run on) given the ids file
    flow_capi.ids_text writes gives the ctypes caller's bytes; tiny-sd3, so its negative ids go through it too."""
    model, fam = "tiny-sd3", load_model("tiny-sd3").family
    tokens, neg = _ids(model, PROMPT), _ids(model, "")
    rc, ctx = lib.open(flow_folders[model], model)
    assert rc == 0, lib.error()
    try:
        rc, want = lib.generate(ctx, STAGES[model], SEED, fam.default_guidance, tokens, neg)
        assert rc == 0, want
    finally:
        lib.lib.mf_context_destroy(ctx)
    (tmp_path / "ids.txt").write_text(ids_text(tokens, neg))
    r = subprocess.run([str(next(cpp_build.rglob("megafusion_flow_run"))), str(flow_folders[model]), model, "cpu",
                        STAGES[model], str(SEED), str(fam.default_guidance), "pixel", "1", str(tmp_path / "ids.txt"),
                        str(tmp_path / "out.rgb")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    h, w = SIZE[model]
    assert r.stdout.split()[:3] == [f"{w}x{h}", "graphs", "on,"], r.stdout
    got = np.fromfile(tmp_path / "out.rgb", dtype=np.uint8).reshape(want.shape)
    assert want.std() > 5 and np.array_equal(got, want)


# A fresh Python process as benchmarks/lab/flow_capi_parity.py is: torch imported (its libraries loaded RTLD_LOCAL),
# libmegafusion through ctypes (RTLD_LOCAL too). Prints whether libtorch's AOTI shims are in the global symbol scope
# before and after a generation (the flow context loads its packages in mf_generate_with).
_LOCAL_HOST = r"""
import ctypes, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from flow_capi import Library
from megafusion.core.loading import load_model
from megafusion.runtime.flow_tokens import flow_token_ids
ids = flow_token_ids(load_model("tiny-flux"), "a red fox")
lib = Library(Path(sys.argv[1]))
shims = lambda: hasattr(ctypes.CDLL(None), "aoti_torch_empty_strided")
print("before", shims())
rc, ctx = lib.open(Path(sys.argv[2]), "tiny-flux", sys.argv[4])
assert rc == 0, lib.error()
rc, img = lib.generate(ctx, "128x128:2,160x160:2", 3, 3.5, ids)
assert rc == 0, img
print("after", shims())
"""


def test_packages_load_with_libtorch_global_in_a_python_host(lib, flux_aoti):
    """A package's wrapper.so finds libtorch's shims in the global scope; Python loads libtorch RTLD_LOCAL, where a
    CUDA package crashed (torch 2.11, SIGSEGV: the flow C API's H200 runs through ctypes). The library promotes the
    loaded libtorch to RTLD_GLOBAL before it loads a package; the CPU can check that it did, not the crash."""
    lines = _local_host(lib, flux_aoti[0], "cpu")
    if lines[:2] != ["before", "False"]:
        pytest.skip(f"this torch already puts its libraries in the global scope ({' '.join(lines)})")
    assert lines[2:] == ["after", "True"], lines


def _local_host(lib, folder: Path, device: str) -> list[str]:
    here = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-c", _LOCAL_HOST, lib.lib._name, str(folder), str(here), device],
                       capture_output=True, text=True, cwd=here.parents[1])
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -11: the crash (SIGSEGV)
    return r.stdout.split()


@pytest.mark.gpu
def test_flow_generation_on_cuda_in_a_fresh_python_host(lib, tmp_path):
    """The H200 crash's setting (torch 2.11, benchmarks/lab/flow_capi_parity.py): CUDA packages, libmegafusion through
    ctypes in a process whose only torch is `import torch` (no Python package load made libtorch global first, as
    one may have in this pytest process). Written without a GPU; not run yet."""
    folder = tmp_path / "engines"
    assert build_cli.main(["--model", "tiny-flux", "--backend", "aoti", "--stages", STAGES["tiny-flux"], "--device",
                           "cuda", "--precision", "fp32", "--output", str(folder)]) == 0
    assert _local_host(lib, folder, "cuda")[2:] == ["after", "True"]


def test_bad_flow_input_is_one_line(lib, flow_folders):
    ids = _ids("tiny-flux", PROMPT)
    rc, ctx = lib.open(flow_folders["tiny-flux"], "tiny-flux")
    assert rc == 0, lib.error()
    try:
        cases = [
            (dict(tokens={"clip_l": ids["clip_l"]}), MF_ERROR_INVALID_ARGUMENT, "no t5 token ids"),
            (dict(tokens={**ids, "t5": ids["t5"][:77]}), MF_ERROR_INVALID_ARGUMENT, "t5: 77 token ids; tiny-flux takes 512"),
            (dict(tokens={**ids, "clip_g": ids["clip_l"]}), MF_ERROR_INVALID_ARGUMENT, "tiny-flux has no clip_g encoder"),
            (dict(tokens={**ids, "bert": [1]}), MF_ERROR_INVALID_ARGUMENT, "unknown text encoder 'bert'"),
            (dict(tokens=ids, negative=ids), MF_ERROR_INVALID_ARGUMENT, "guidance-distilled"),
            (dict(tokens={**ids, "t5": [10**6] * 512}), MF_ERROR_INVALID_ARGUMENT, "outside its vocabulary of 140"),
            (dict(tokens=ids, stages="128x128:2,192x192:2"), MF_ERROR_UNSUPPORTED_SIZE,
             "mf-build-engines --model tiny-flux"),
            (dict(tokens=ids, relay="nearest"), MF_ERROR_INVALID_ARGUMENT, "unknown relay mode 'nearest'"),
        ]
        for kw, code, message in cases:
            rc, err = lib.generate(ctx, kw.pop("stages", STAGES["tiny-flux"]), SEED, 3.5, kw.pop("tokens"), kw.pop("negative", None),
                                   kw.pop("relay", "pixel"))
            assert rc == code and message in err and "\n" not in err, (message, rc, err)
    finally:
        lib.lib.mf_context_destroy(ctx)
    rc, ctx = lib.open(flow_folders["tiny-sd3"], "tiny-sd3")
    assert rc == 0, lib.error()
    try:
        rc, err = lib.generate(ctx, STAGES["tiny-sd3"], SEED, 7.0, _ids("tiny-sd3", PROMPT))
        assert rc == MF_ERROR_INVALID_ARGUMENT and "no negative clip_l token ids" in err, err
    finally:
        lib.lib.mf_context_destroy(ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_flow_generation_on_cuda_equals_python(lib, tmp_path, model):
    """The same on CUDA (fp32 packages built for the GPU; runs where CUDA is, e.g. the lent H200)."""
    fam = load_model(model).family
    folder = tmp_path / "engines"
    assert build_cli.main(["--model", model, "--backend", "aoti", "--stages", STAGES[model], "--device", "cuda",
                           "--precision", "fp32", "--output", str(folder)]) == 0
    rc, ctx = lib.open(folder, model, "cuda")
    assert rc == 0, lib.error()
    try:
        neg = _ids(model, "") if fam.cfg else None
        rc, cpp = lib.generate(ctx, STAGES[model], SEED, fam.default_guidance, _ids(model, PROMPT), neg)
        assert rc == 0, cpp
    finally:
        lib.lib.mf_context_destroy(ctx)
    out = tmp_path / "py.png"
    assert gen_cli.main(["--model", model, "--engines", str(folder), "--stages", STAGES[model], "--prompt", PROMPT,
                         "--seed", str(SEED), "--device", "cuda", "--dtype", "fp32", "--no-progress",
                         "--output", str(out)]) == 0
    py = np.asarray(Image.open(out).convert("RGB"))
    assert py.std() > 5 and np.abs(cpp.astype(int) - py.astype(int)).max() <= IMAGE_TOL
