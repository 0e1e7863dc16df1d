"""Shared fixtures: tiny models on CPU, built once per session."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.background import BUILDS, Job, build_engines_cmd, python_cmd

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


@pytest.fixture
def no_tf32():
    """cuDNN's TF32 convolutions round differently per algorithm (channels_last, compiled or not, a package's or
    the module's): measured 1.6e-3 relative on the tiny VAE decode with TF32 on, 2e-6 with it off. GPU tests that
    compare two implementations of one function compare with TF32 off."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU tests run on the lent H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The slow builds, each named by the fixture that needs it (tests/background.py runs them beside the tests).
TRIGGERS = {"sd15_aoti": "sd15_aoti", "sd15_control_aoti": "sd15_control_aoti", "flux_aoti": "flux_aoti",
            "sd3_aoti": "sd3_aoti", "aoti_static": "static_engines", "cpp": "cpp_build",
            "compile_cache_first": "compile_cache_first", "aoti_apart": "apart_engines",
            "sd15_apart_aoti": "sd15_apart_aoti", "flux_control_aoti": "flux_control_aoti",
            "sd3_control_aoti": "sd3_control_aoti", "sd15_ip_aoti": "sd15_ip_aoti", "aoti_fp8": "fp8_engines",
            "aoti_fp8_static": "fp8_static_engines"}
REPO = Path(__file__).resolve().parents[1]

CONTROL_DRIVER = """
import shutil, sys
from pathlib import Path
from megafusion.cli.build_engines import main
from megafusion.core.loading import load_model
from tests.runtime.test_controlnet import save_tiny_controlnet
src, root, stages = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
shutil.copytree(src, root / "engines")
cn = save_tiny_controlnet(load_model("tiny-sd15").unet, root / "edges", 5)
sys.exit(main(["--model", "tiny-sd15", "--stages", stages, "--backend", "aoti", "--device", "cpu", "--controlnet",
               str(cn), "--networks", "controlnet,unet_controlled", "--output", str(root / "engines")]))
"""

# A copy of a session's SD3 / FLUX folder plus a tiny flow ControlNet's packages and the controlled transformer's
# for a plan of one stage shape the copy's plain transformer already serves: two compiles.
FLOW_CONTROL_DRIVER = """
import shutil, sys
from pathlib import Path
from megafusion.cli.build_engines import main
from megafusion.core.loading import load_model
from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet
model, src, root, stages = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
shutil.copytree(src, root / "e")
cn = save_tiny_flow_controlnet(load_model(model).family, root / "edges", seed=1)
sys.exit(main(["--model", model, "--backend", "aoti", "--stages", stages, "--device", "cpu", "--networks",
               "transformer", "--controlnet", str(cn), "--output", str(root / "e")]))
"""

# A copy of the session's tiny-sd15 folder plus a tiny IP-Adapter's (seed 3) unet_ip static packages (standard and
# dilated: two compiles) and the tiny image encoder's package (a third, about 10 s) for the C API tests
# tests/cpp/test_libmegafusion_ip*.py and tests/engine/test_image_encoder_engines.py.
IP_DRIVER = """
import shutil, sys
from pathlib import Path
from megafusion.cli.build_engines import main
from megafusion.core.loading import load_model
from tests.runtime.test_ipadapter import save_ip_adapter, save_tiny_image_encoder, tiny_ip_adapter
src, root, stages, scale = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
shutil.copytree(src, root / "engines")
ip = save_ip_adapter(tiny_ip_adapter(load_model("tiny-sd15").unet, seed=3), root / "ip.safetensors")
save_tiny_image_encoder(root / "encoder")
sys.exit(main(["--model", "tiny-sd15", "--stages", stages, "--backend", "aoti", "--device", "cpu", "--ip-adapter",
               str(ip), "--ip-adapter-scale", scale, "--ip-adapter-encoder", str(root / "encoder"), "--networks",
               "unet_ip,image_encoder", "--output", str(root / "engines")]))
"""

# A copy of the session's tiny-sd15 folder whose UNets are --weights-apart packages (the same --dynamic range):
# the packages with their weights inside are dropped from the copy's manifest, so every reader runs the apart ones.
APART_DRIVER = """
import shutil, sys
from pathlib import Path
from megafusion.cli.build_engines import main
from tests.cpp.test_libmegafusion_apart import drop_inside_unets
src, out, stages = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
shutil.copytree(src, out)
if main(["--model", "tiny-sd15", "--stages", stages, "--backend", "aoti", "--dynamic", "--device", "cpu",
         "--networks", "unet", "--weights-apart", "--output", str(out)]) != 0:
    sys.exit(1)
drop_inside_unets(out)
"""

# test_aoti_fp8_static: the FP8 folder copied whole, then its UNet again with static input scales (calibrated into the
# package, recorded in the entry's static_scales.json) and its weights apart: argv is the source folder, the output
# folder, the plan.
FP8_STATIC_DRIVER = """
import shutil, sys
from pathlib import Path
from megafusion.cli.build_engines import main
src, out, stages = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
shutil.copytree(src, out)
sys.exit(main(["--model", "tiny-sd15", "--stages", stages, "--backend", "aoti", "--device", "cpu", "--precision",
               "fp8", "--fp8-scales", "static", "--weights-apart", "--no-dilation", "--networks", "unet",
               "--output", str(out)]))
"""

# A build into a folder that first receives one network's entries of the session's tiny-sd15 folder (copied, not
# compiled again): argv is the source folder, the output folder, the network copied, then mf-build-engines' options.
# test_aoti_static: its PLAN's static packages, no dilation; the text encoder has no spatial axes, so its static
# package is the session folder's (same key). test_aoti_fp8: the FP8 UNet's static package (the one new compile that
# matters, about 40 s on 2 cores) and the fp16 text encoder an fp8 build pairs with it (about 10 s), beside the
# session's fp32 VAE decoder (a range package over 128 to 256 px: a run takes any VAE precision).
COPY_THEN_BUILD_DRIVER = """
import json, shutil, sys
from pathlib import Path
from megafusion.cli.build_engines import main
src, out, network = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
manifest = json.loads((src / "manifest.json").read_text())
manifest["entries"] = [e for e in manifest["entries"] if e["key"]["network"] == network]
for e in manifest["entries"]:
    folder = Path(e["files"][0]["path"]).parent
    shutil.copytree(src / folder, out / folder)
(out / "manifest.json").write_text(json.dumps(manifest, indent=1))
sys.exit(main(["--model", "tiny-sd15", "--backend", "aoti", "--device", "cpu", "--output", str(out), *sys.argv[4:]]))
"""


def _job(builds, name: str) -> Job:
    f = builds.folder
    if name == "sd15_aoti":
        return Job(name, build_engines_cmd("--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti",
                                           "--dynamic", "--device", "cpu", "--output", str(f("sd15-aoti"))))
    if name == "sd15_control_aoti":
        return Job(name, python_cmd(CONTROL_DRIVER) + [str(f("sd15-aoti")), str(f("control-aoti")), AOTI_STAGES],
                   cwd=REPO, after="sd15_aoti")
    if name == "sd15_ip_aoti":
        return Job(name, python_cmd(IP_DRIVER) + [str(f("sd15-aoti")), str(f("ip-aoti")), AOTI_STAGES, str(IP_SCALE)],
                   cwd=REPO, after="sd15_aoti")
    if name == "sd15_apart_aoti":
        return Job(name, python_cmd(APART_DRIVER) + [str(f("sd15-aoti")), str(f("sd15-apart") / "e"), AOTI_STAGES],
                   cwd=REPO, after="sd15_aoti")
    if name in ("flux_aoti", "sd3_aoti"):
        model, stages = ("tiny-flux", FLUX_AOTI_STAGES) if name == "flux_aoti" else ("tiny-sd3", SD3_AOTI_STAGES)
        return Job(name, build_engines_cmd("--model", model, "--backend", "aoti", "--stages", stages, "--device",
                                           "cpu", "--output", str(f(name) / "e")))
    if name in ("flux_control_aoti", "sd3_control_aoti"):
        base = name.replace("_control", "")
        model, stages = ("tiny-flux", FLUX_CONTROL_STAGES) if base == "flux_aoti" else ("tiny-sd3", SD3_CONTROL_STAGES)
        return Job(name, python_cmd(FLOW_CONTROL_DRIVER) + [model, str(f(base) / "e"), str(f(name)), stages],
                   cwd=REPO, after=base)
    if name == "aoti_static":
        from tests.engine.test_aoti_static import PLAN

        return Job(name, python_cmd(COPY_THEN_BUILD_DRIVER) + [
            str(f("sd15-aoti")), str(f("aoti-static")), "text_encoder", "--stages", PLAN, "--no-dilation",
            "--networks", "text_encoder,unet,vae_decoder"], cwd=REPO, after="sd15_aoti")
    if name == "aoti_fp8":
        from tests.engine.test_aoti_fp8 import PLAN as FP8_PLAN

        return Job(name, python_cmd(COPY_THEN_BUILD_DRIVER) + [
            str(f("sd15-aoti")), str(f("aoti-fp8")), "vae_decoder", "--stages", FP8_PLAN, "--precision", "fp8",
            "--no-dilation", "--networks", "text_encoder,unet"], cwd=REPO, after="sd15_aoti")
    if name == "aoti_fp8_static":
        from tests.engine.test_aoti_fp8 import PLAN as FP8_PLAN

        return Job(name, python_cmd(FP8_STATIC_DRIVER) + [str(f("aoti-fp8")), str(f("aoti-fp8-static")), FP8_PLAN],
                   cwd=REPO, after="aoti_fp8")
    if name == "cpp":  # configured without engines: the fixture names them after (a quick reconfigure)
        build = shlex.quote(str(f("cpp-build")))
        script = (f"set -eo pipefail; cmake -S {shlex.quote(str(REPO))} -B {build} -DCMAKE_BUILD_TYPE=Release "
                  f"-DPython3_EXECUTABLE={shlex.quote(sys.executable)} -DMEGAFUSION_TEST_MODEL=tiny-sd15 | tee {build}.log; "
                  f"grep -q 'skipping libmegafusion' {build}.log && exit 0; "
                  f"cmake --build {build} --target mf-generate-cpp megafusion_c_api_test "
                  "megafusion_aoti_weights_test -j2")
        return Job(name, ["bash", "-c", script])
    if name == "aoti_apart":
        from tests.engine.test_aoti_weights_apart import PLAN as APART_PLAN

        return Job(name, build_engines_cmd("--model", "tiny-sdxl", "--stages", APART_PLAN, "--backend", "aoti",
                                           "--device", "cpu", "--networks", "unet", "--weights-apart", "--output",
                                           str(f("aoti-apart") / "e")))
    if name == "compile_cache_first":  # the first of test_compile_cache's two processes
        from tests.engine.test_compile_cache import DRIVER

        root = f("compile-cache")
        return Job(name, python_cmd(DRIVER) + [str(root / "cc"), str(root / "a.pt")],
                   env={"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor-a")})
    raise KeyError(name)


BUILDS.factory = _job


def pytest_collection_finish(session):
    """Queue the builds the selected tests need, and run the test files that need none first, so that the tests
    keep one core busy while the builds use the other; the first needed build is queued first (a dependency
    before its user). The files that need builds then run in the order of the last build each needs, so that the
    ones the first builds serve run while the later builds are made. Files keep their own order of tests."""
    if session.config.option.collectonly:
        return
    jobs_of = {item.nodeid: [job for job, fixture in TRIGGERS.items() if fixture in getattr(item, "fixturenames", ())]
               for item in session.items if item.get_closest_marker("skip") is None}
    file_of = lambda item: item.nodeid.split("::")[0]
    waiting = {nodeid.split("::")[0] for nodeid, jobs in jobs_of.items() if jobs}
    session.items[:] = ([i for i in session.items if file_of(i) not in waiting]
                        + [i for i in session.items if file_of(i) in waiting])
    queued: dict[str, Job] = {}
    skip = set() if shutil.which("cmake") else {"cpp"}  # the fixture skips those tests

    def queue(name: str) -> None:  # a build's dependencies first, however deep (aoti_fp8_static needs two)
        if name in queued or name in skip:
            return
        job = _job(BUILDS, name)
        if job.after is not None:
            queue(job.after)
        queued[name] = job

    for item in session.items:
        for name in jobs_of.get(item.nodeid, ()):
            queue(name)
    position = {name: n for n, name in enumerate(queued)}
    last: dict[str, int] = {}  # file -> queue position of the last build it needs
    for item in session.items:
        for name in jobs_of.get(item.nodeid, ()):
            last[file_of(item)] = max(last.get(file_of(item), -1), position.get(name, -1))
    session.items.sort(key=lambda i: (file_of(i) in waiting, last.get(file_of(i), -1)))  # stable: files stay whole
    if queued:
        BUILDS.start(list(queued.values()))


def pytest_sessionfinish(session):
    BUILDS.stop()


def pytest_terminal_summary(terminalreporter):
    lines = BUILDS.summary()
    if lines:
        terminalreporter.write_sep("-", "background builds (tests/background.py)")
        for line in lines:
            terminalreporter.write_line(line)


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
def sd15_aoti():
    """tiny-sd15 range packages from `mf-build-engines --backend aoti --dynamic` (engine and C++ library tests
    share them); tests/engine/test_aoti_static.py builds the default static ones."""
    BUILDS.get("sd15_aoti")
    return BUILDS.folder("sd15-aoti")


@pytest.fixture(scope="session")
def sd15_control_aoti(sd15_aoti) -> tuple[Path, Path]:
    """(engine folder, ControlNet folder): the session's tiny-sd15 packages plus a tiny ControlNet's static
    AOTInductor packages of AOTI_STAGES (controlnet and unet_controlled, standard and dilated: four compiles, minutes
    on 2 cores), built once for the C API tests (tests/cpp) and the engine tests (tests/engine)."""
    BUILDS.get("sd15_control_aoti")
    root = BUILDS.folder("control-aoti")
    return root / "engines", root / "edges"


@pytest.fixture(scope="session")
def sd15_ip_aoti(sd15_aoti) -> tuple[Path, Path, Path]:
    """(engine folder, IP-Adapter file, image encoder folder): the session's tiny-sd15 packages plus a tiny
    IP-Adapter's unet_ip static packages of AOTI_STAGES at IP_SCALE (standard and dilated: two compiles) and the
    tiny image encoder's package, built once for the C API tests and tests/engine/test_image_encoder_engines.py."""
    BUILDS.get("sd15_ip_aoti")
    root = BUILDS.folder("ip-aoti")
    return root / "engines", root / "ip.safetensors", root / "encoder"


@pytest.fixture(scope="session")
def sd15_apart_aoti(sd15_aoti) -> Path:
    """The session's tiny-sd15 folder with its UNets rebuilt by `mf-build-engines --weights-apart` (standard and
    dilated: two compiles, a few minutes on 2 cores) and the UNets with their weights inside dropped, built once for
    the C API tests (tests/cpp/test_libmegafusion_apart.py); tests that change the folder copy it."""
    BUILDS.get("sd15_apart_aoti")
    return BUILDS.folder("sd15-apart") / "e"


FLUX_AOTI_STAGES = "128x128:2,160x160:1"
"""The plan of the session's tiny-flux packages (one static package per network and stage shape)."""
SD3_AOTI_STAGES = "128x128:2,192x160:2"
"""The plan of the session's tiny-sd3 packages (non-square second stage: the token grid's two sides differ)."""


FLUX_CONTROL_STAGES = "160x160:2,160x160:2"
"""The plan of the session's tiny-flux ControlNet packages: FLUX_AOTI_STAGES' second shape twice (its plain
transformer, VAE encoder and decoder are in the folder copied)."""
SD3_CONTROL_STAGES = "192x160:2,192x160:2"
"""Likewise for tiny-sd3 (SD3_AOTI_STAGES' second shape)."""


def _dit_aoti(name: str) -> tuple[Path, str]:
    return BUILDS.folder(name) / "e", BUILDS.get(name).stdout


@pytest.fixture(scope="session")
def flux_aoti() -> tuple[Path, str]:
    """(engine folder, what mf-build-engines printed): tiny-flux's AOTInductor packages of FLUX_AOTI_STAGES, every
    network (transformer, text encoders, VAE: seven compiles, a few minutes on 2 cores), built once for
    tests/cli/test_generate_flow.py, tests/engine/test_dit_engines.py, test_dit_controlnet_engines.py and the C API's
    tests/cpp/test_libmegafusion_flow.py; tests that change the folder copy it."""
    return _dit_aoti("flux_aoti")


@pytest.fixture(scope="session")
def sd3_aoti() -> tuple[Path, str]:
    """(engine folder, what mf-build-engines printed): tiny-sd3's AOTInductor packages of SD3_AOTI_STAGES, every
    network, built once for tests/engine/test_dit_engines.py and tests/cpp/test_libmegafusion_flow.py."""
    return _dit_aoti("sd3_aoti")


def _flow_control(name: str) -> tuple[Path, Path]:
    BUILDS.get(name)
    root = BUILDS.folder(name)
    return root / "e", root / "edges"


@pytest.fixture(scope="session")
def flux_control_aoti(flux_aoti) -> tuple[Path, Path]:
    """(engine folder, ControlNet folder): a copy of the session's tiny-flux folder plus a tiny FluxControlNetModel's
    (seed 1, named "edges" in models.json) and the controlled transformer's packages for FLUX_CONTROL_STAGES (two
    compiles), built once for the C API test tests/cpp/test_libmegafusion_flow_control.py."""
    return _flow_control("flux_control_aoti")


@pytest.fixture(scope="session")
def sd3_control_aoti(sd3_aoti) -> tuple[Path, Path]:
    """The same for tiny-sd3 (an SD3ControlNetModel: zero pooled projections, unshifted latent) and
    SD3_CONTROL_STAGES."""
    return _flow_control("sd3_control_aoti")


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


IP_SCALE = 0.7
"""The scale the session's IP-Adapter engines (`sd15_ip_ort`) are built with."""


@pytest.fixture(scope="session")
def sd15_ip_ort(tiny_sd15, sd15_engines, tmp_path_factory) -> tuple[Path, Path, str]:
    """(engine folder, IP-Adapter file, what mf-build-engines printed): the session's tiny-sd15 ONNX Runtime engines
    plus a tiny random IP-Adapter's unet_ip engines (seed 3, IP_SCALE) and the tiny image encoder's engine (saved in
    the folder's parent as `encoder`: `ip_encoder`), built by `mf-build-engines --ip-adapter --ip-adapter-encoder`
    once for tests/engine/test_ipadapter_engines.py, tests/engine/test_image_encoder_engines.py and
    tests/cli/test_ipadapter_engines_cli.py (three ONNX exports, seconds); tests that change the folder copy it
    first."""
    import contextlib
    import io

    from megafusion.cli import build_engines as build_cli
    from tests.engines import STAGES
    from tests.runtime.test_ipadapter import save_ip_adapter, save_tiny_image_encoder, tiny_ip_adapter

    root = tmp_path_factory.mktemp("ip-ort")
    out = root / "engines"
    shutil.copytree(sd15_engines, out)  # the plain engines are there: only the unet_ip ones are built
    ip = save_ip_adapter(tiny_ip_adapter(tiny_sd15.unet, seed=3), root / "ip.safetensors")
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        assert build_cli.main(["--model", "tiny-sd15", "--stages", STAGES, "--device", "cpu", "--ip-adapter", str(ip),
                               "--ip-adapter-scale", str(IP_SCALE), "--ip-adapter-encoder",
                               str(save_tiny_image_encoder(root / "encoder")), "--output", str(out)]) == 0
    return out, ip, said.getvalue()


@pytest.fixture(scope="session")
def ip_encoder(sd15_ip_ort) -> Path:
    """The tiny image encoder folder (tests/runtime/test_ipadapter.py save_tiny_image_encoder) whose engine
    `sd15_ip_ort` holds."""
    return sd15_ip_ort[0].parent / "encoder"


@pytest.fixture
def sdxl_copy(sdxl_engines, tmp_path):
    """A private copy of the built folder, for tests that damage it."""
    dst = tmp_path / "engines"
    shutil.copytree(sdxl_engines, dst)
    return dst


def _run_cmd(cmd) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True)


@pytest.fixture(scope="session")
def cpp_build(sd15_aoti) -> Path:
    """libmegafusion and mf-generate-cpp, built once a session for every test that runs them (tests/cpp,
    tests/lab): about a minute and a half of CMake on 2 cores, beside the tests (tests/background.py)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if "skipping libmegafusion" in BUILDS.get("cpp").stdout:
        pytest.skip("torch's CMake package was not found, so libmegafusion is not configured")
    build = BUILDS.folder("cpp-build")
    cfg = _run_cmd(["cmake", "-S", REPO, "-B", build, f"-DMEGAFUSION_TEST_ENGINES={sd15_aoti}"])  # adds a ctest
    assert cfg.returncode == 0, cfg.stdout[-2000:] + cfg.stderr[-2000:]
    b = _run_cmd(["cmake", "--build", build, "--target", "mf-generate-cpp", "megafusion_c_api_test",
                  "megafusion_aoti_weights_test", "megafusion_flow_run", "-j2"])
    assert b.returncode == 0, b.stdout[-4000:] + b.stderr[-2000:]
    return build
