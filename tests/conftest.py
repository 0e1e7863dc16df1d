"""Shared fixtures: tiny models on CPU, built once per session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The memory-estimate cache (runtime/memory_cache.py) of every run in the tests, subprocesses included, goes
    to a folder of the session's, not the user's ~/.cache; a test that sets MEGAFUSION_CACHE itself still wins."""
    if "MEGAFUSION_CACHE" in os.environ:
        yield
        return
    os.environ["MEGAFUSION_CACHE"] = str(tmp_path_factory.mktemp("mf-cache"))
    yield
    os.environ.pop("MEGAFUSION_CACHE", None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU tests run on the lent H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (restored afterwards): on 2 shared cores it keeps small UNets from thrashing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_sd15():
    from megafusion.core.loading import load_model

    return load_model("tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from megafusion.core.loading import load_model

    return load_model("tiny-sdxl")


AOTI_STAGES = "128x128:2,256x256:2"
"""The plan the AOTInductor packages are built for (one package per network serves 128 to 256 px sides)."""


@pytest.fixture(scope="session")
def sd15_aoti(tmp_path_factory):
    """tiny-sd15 range packages from `mf-build-engines --backend aoti --dynamic` (engine and C++ library tests
    share them); tests/engine/test_aoti_static.py builds the default static ones."""
    from megafusion.cli.build_engines import main as build_main

    out = tmp_path_factory.mktemp("engines-aoti")
    assert build_main(["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti", "--dynamic",
                       "--device", "cpu", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def sd15_control_aoti(sd15_aoti, tmp_path_factory) -> tuple[Path, Path]:
    """(engine folder, ControlNet folder): the session's tiny-sd15 packages plus a tiny ControlNet's static
    AOTInductor packages of AOTI_STAGES (controlnet and unet_controlled, standard and dilated: four compiles, minutes
    on 2 cores), built once for the C API tests (tests/cpp) and the engine tests (tests/engine)."""
    from megafusion.cli.build_engines import main as build_main
    from megafusion.core.loading import load_model
    from tests.runtime.test_controlnet import save_tiny_controlnet

    root = tmp_path_factory.mktemp("control-aoti")
    out = root / "engines"
    shutil.copytree(sd15_aoti, out)
    cn = save_tiny_controlnet(load_model("tiny-sd15").unet, root / "edges", 5)
    assert build_main(["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti", "--device", "cpu",
                       "--controlnet", str(cn), "--networks", "controlnet,unet_controlled",
                       "--output", str(out)]) == 0
    return out, cn


FLUX_AOTI_STAGES = "128x128:2,160x160:1"
"""The plan of the session's tiny-flux packages (one static package per network and stage shape)."""
SD3_AOTI_STAGES = "128x128:2,192x160:2"
"""The plan of the session's tiny-sd3 packages (non-square second stage: the token grid's two sides differ)."""


def _dit_aoti(tmp_path_factory, model: str, stages: str) -> tuple[Path, str]:
    import contextlib
    import io

    from megafusion.cli.build_engines import main as build_main

    out = tmp_path_factory.mktemp(f"{model}-aoti") / "e"
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        assert build_main(["--model", model, "--backend", "aoti", "--stages", stages, "--device", "cpu",
                           "--output", str(out)]) == 0
    return out, said.getvalue()


@pytest.fixture(scope="session")
def flux_aoti(tmp_path_factory) -> tuple[Path, str]:
    """(engine folder, what mf-build-engines printed): tiny-flux's AOTInductor packages of FLUX_AOTI_STAGES, every
    network (transformer, text encoders, VAE: seven compiles, a few minutes on 2 cores), built once for
    tests/cli/test_generate_flow.py, tests/engine/test_dit_engines.py, test_dit_controlnet_engines.py and the C API's
    tests/cpp/test_libmegafusion_flow.py; tests that change the folder copy it."""
    return _dit_aoti(tmp_path_factory, "tiny-flux", FLUX_AOTI_STAGES)


@pytest.fixture(scope="session")
def sd3_aoti(tmp_path_factory) -> tuple[Path, str]:
    """(engine folder, what mf-build-engines printed): tiny-sd3's AOTInductor packages of SD3_AOTI_STAGES, every
    network, built once for tests/engine/test_dit_engines.py and tests/cpp/test_libmegafusion_flow.py."""
    return _dit_aoti(tmp_path_factory, "tiny-sd3", SD3_AOTI_STAGES)


# Engine folders built once per session (tests/engines.py says how).
@pytest.fixture(scope="session")
def sdxl_engines(tmp_path_factory, tiny_sdxl):
    out = tmp_path_factory.mktemp("engines-sdxl")
    from tests.engines import build

    build(tiny_sdxl, out)
    return out


@pytest.fixture(scope="session")
def sd15_engines(tmp_path_factory, tiny_sd15):
    out = tmp_path_factory.mktemp("engines-sd15")
    from tests.engines import build

    build(tiny_sd15, out)
    return out


@pytest.fixture(scope="session")
def sd15_control_ort(tiny_sd15, sd15_engines, tmp_path_factory) -> tuple[Path, Path, str]:
    """(engine folder, ControlNet folder, what mf-build-engines printed): the session's tiny-sd15 ONNX Runtime engines
    plus a tiny ControlNet's (seed 5), built by `mf-build-engines --controlnet` once for the CLI and server tests
    (tests/cli/test_controlnet_engines_cli.py checks the printout; tests that change the folder copy it first)."""
    import contextlib
    import io

    from megafusion.cli import build_engines as build_cli
    from tests.engines import STAGES
    from tests.runtime.test_controlnet import save_tiny_controlnet

    root = tmp_path_factory.mktemp("control-ort")
    out = root / "engines"
    shutil.copytree(sd15_engines, out)  # the plain engines are there: only the ControlNet's are built
    cn = save_tiny_controlnet(tiny_sd15.unet, root / "cn", 5)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        assert build_cli.main(["--model", "tiny-sd15", "--stages", STAGES, "--device", "cpu", "--controlnet", str(cn),
                               "--output", str(out)]) == 0
    return out, cn, said.getvalue()


@pytest.fixture
def sdxl_copy(sdxl_engines, tmp_path):
    """A private copy of the built folder, for tests that damage it."""
    dst = tmp_path / "engines"
    shutil.copytree(sdxl_engines, dst)
    return dst


def _run_cmd(cmd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True)


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory, sd15_aoti) -> Path:
    """libmegafusion and mf-generate-cpp, built once a session for every test that runs them (tests/cpp,
    tests/lab): about a minute of CMake on 2 cores, several under load."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("cpp-build")
    cfg = _run_cmd([cmake, "-S", Path(__file__).resolve().parents[1], "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                    f"-DPython3_EXECUTABLE={sys.executable}", f"-DMEGAFUSION_TEST_ENGINES={sd15_aoti}",
                    "-DMEGAFUSION_TEST_MODEL=tiny-sd15"])
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    if "skipping libmegafusion" in cfg.stdout:
        pytest.skip("torch's CMake package was not found, so libmegafusion is not configured")
    b = _run_cmd([cmake, "--build", build, "--target", "mf-generate-cpp", "megafusion_c_api_test", "-j2"])
    assert b.returncode == 0, b.stdout[-4000:] + b.stderr[-2000:]
    return build
