"""libmegafusion's ControlNets inside the whole-step CUDA graph (GPU): one capture per stage descriptor however the
scale and schedule window change (they are buffers the graph reads), and the graphed image within 2 levels of the
same library with graphs off and of Python's `mf-generate --engines --controlnet` on the same packages.

Builds libmegafusion with CUDA, tiny-sd15 AOTInductor packages on the GPU and a tiny ControlNet's; skipped without
CUDA (tests/conftest.py) or nvcc.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.runtime.tokens import format_ids, load_tokenizers

from ..conftest import AOTI_STAGES
from .test_libmegafusion_graphs import COUNTERS, GRAPH_TOL, _max_diff, _run

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def control_cuda(sd15_aoti_cuda, tmp_path_factory) -> tuple[Path, Path]:
    from megafusion.cli.build_engines import main as build_main
    from megafusion.core.loading import load_model
    from tests.runtime.test_controlnet import save_tiny_controlnet

    root = tmp_path_factory.mktemp("cuda-control")
    out = root / "engines"
    shutil.copytree(sd15_aoti_cuda, out)
    cn = save_tiny_controlnet(load_model("tiny-sd15").unet, root / "edges", 5)
    assert build_main(["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti", "--device", "cuda",
                       "--controlnet", str(cn), "--networks", "controlnet,unet_controlled", "--output", str(out)]) == 0
    return out, cn


def _edges(tmp: Path) -> tuple[Path, Path]:
    px = np.random.default_rng(4).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    Image.fromarray(px).save(tmp / "edges.png")
    (tmp / "edges.ppm").write_bytes(b"P6\n80 96\n255\n" + px.tobytes())
    return tmp / "edges.png", tmp / "edges.ppm"


def _cpp(build: Path, engines: Path, tmp: Path, *flags) -> tuple[np.ndarray, tuple]:
    ids = tmp / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), "a red cube", "blurry"))
    png = tmp / "cpp.png"
    r = _run([build / "cpp" / "mf-generate-cpp", "--engines", engines, "--model", "tiny-sd15", "--ids", ids,
              "--stages", AOTI_STAGES, "--seed", 3, "--device", "cuda", "--repeats", 2, "--output", png, *flags])
    assert r.returncode == 0, r.stderr
    m = COUNTERS.search(r.stdout)
    return np.asarray(Image.open(png).convert("RGB")), (m.group(1), int(m.group(2)), int(m.group(3)))


@pytest.mark.parametrize("window", [[], ["--control-start", "0.25", "--control-end", "0.75"]])
def test_controlled_graphs_count_and_match(cuda_build, control_cuda, tmp_path, window):
    from megafusion.cli import generate as gen_cli

    out, cn = control_cuda
    png, ppm = _edges(tmp_path)
    control = ["--control-scale", "0.9", *window]
    graphed, (on, captures, replays) = _cpp(cuda_build, out, tmp_path, "--controlnet", "edges", "--control-image",
                                            ppm, *control)
    plain, (off, _, _) = _cpp(cuda_build, out, tmp_path, "--controlnet", "edges", "--control-image", ppm, *control,
                              "--no-graphs")
    assert (on, captures, replays) == ("on", 2, 2 * 4)  # two stage descriptors, captured once for two generations
    assert off == "off" and graphed.std() > 5
    assert _max_diff(graphed, plain) <= GRAPH_TOL
    py = tmp_path / "py.png"
    assert gen_cli.main(["--model", "tiny-sd15", "--engines", str(out), "--stages", AOTI_STAGES, "--prompt",
                         "a red cube", "--negative-prompt", "blurry", "--seed", "3", "--device", "cuda",
                         "--no-progress", "--controlnet", str(cn), "--control-image", str(png), *control,
                         "--output", str(py)]) == 0
    assert _max_diff(graphed, np.asarray(Image.open(py).convert("RGB"))) <= GRAPH_TOL
