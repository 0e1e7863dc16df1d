"""libmegafusion's inputs beyond the params (mf_inputs; issue #18 item 5): image to image and ControlNets through
the C API give Python's `mf-generate --engines` image within 1 level of 255, on the same tiny-sd15 AOTInductor
packages, token ids and seed; a bad input is one line naming it, before any network runs.

The C++ side is cpp/examples/mf_generate_cpp (--image / --control-image take binary PPM; Python reads the same
pixels from PNG). The ControlNet packages (controlnet and unet_controlled, standard and dilated: four AOTInductor
compiles, about 5 minutes on two cores) are built once into a copy of the session's tiny-sd15 folder
(tests/conftest.py `sd15_control_aoti`, shared with tests/engine/test_controlnet_engines.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.cli import generate as gen_cli
from megafusion.runtime.pipeline import GenerationOptions
from megafusion.runtime.tokens import format_ids, load_tokenizers

from ..conftest import AOTI_STAGES
from .test_libmegafusion import IMAGE_TOL, _run

pytestmark = pytest.mark.slow

PROMPT, NEGATIVE, SEED = "a red cube", "blurry", 3


def _pictures(tmp: Path, name: str, h: int, w: int, seed: int) -> tuple[Path, Path]:
    """The same random RGB picture as PNG (for Python) and binary PPM (for the C++ example)."""
    px = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    png, ppm = tmp / f"{name}.png", tmp / f"{name}.ppm"
    Image.fromarray(px).save(png)
    ppm.write_bytes(b"P6\n%d %d\n255\n" % (w, h) + px.tobytes())
    return png, ppm


def _cpp(build: Path, engines: Path, tmp: Path, *flags) -> tuple[np.ndarray | None, object]:
    ids = tmp / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), PROMPT, NEGATIVE))
    png = tmp / "cpp.png"
    png.unlink(missing_ok=True)
    r = _run([build / "cpp" / "mf-generate-cpp", "--engines", engines, "--model", "tiny-sd15", "--ids", ids,
              "--stages", AOTI_STAGES, "--seed", SEED, "--output", png, *flags])
    return (np.asarray(Image.open(png).convert("RGB")) if r.returncode == 0 else None), r


def _python(engines: Path, tmp: Path, *flags) -> np.ndarray:
    out = tmp / "py.png"
    assert gen_cli.main(["--model", "tiny-sd15", "--engines", str(engines), "--stages", AOTI_STAGES, "--prompt",
                         PROMPT, "--negative-prompt", NEGATIVE, "--seed", str(SEED), "--device", "cpu",
                         "--no-progress", "--output", str(out), *map(str, flags)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def _close(cpp: np.ndarray, py: np.ndarray) -> None:
    assert cpp is not None and cpp.shape == py.shape
    assert py.std() > 5  # a real image, not two blank ones agreeing
    diff = np.abs(cpp.astype(int) - py.astype(int))
    assert diff.max() <= IMAGE_TOL, (diff.max(), diff.mean())


# ------------------------------------------------------------------------------------------------ image to image

@pytest.mark.parametrize("py_flags, cpp_flags", [
    (["--strength", "0.75"], ["--strength", "0.75"]),   # 3 of 4 steps: stage 1, its first step skipped
    (["--strength", "0.5"], ["--strength", "0.5"]),     # 2 of 4: the photo enters stage 2 at 256x256
    (["--start-stage", "2"], ["--start-stage", "2"]),   # stage 2's first step, no strength given
])
def test_image_to_image_equals_python(cpp_build, sd15_aoti, tmp_path, py_flags, cpp_flags):
    png, ppm = _pictures(tmp_path, "photo", 96, 80, 1)
    cpp, r = _cpp(cpp_build, sd15_aoti, tmp_path, "--image", ppm, *cpp_flags)
    assert r.returncode == 0, r.stderr
    py = _python(sd15_aoti, tmp_path, "--image", png, *py_flags)
    _close(cpp, py)
    plain, _ = _cpp(cpp_build, sd15_aoti, tmp_path)
    assert np.abs(plain.astype(int) - cpp.astype(int)).max() > 10  # the photo changed the image


def test_image_to_image_refusals_name_the_value(cpp_build, sd15_aoti, tmp_path):
    _, ppm = _pictures(tmp_path, "photo", 32, 32, 2)
    for flags, code, needle in [
        (["--strength", "0.1"], 1, "strength 0.1: runs int(4 * 0.1) = 0 of the plan's 4 steps; give at least 0.25"),
        (["--strength", "0.75", "--start-stage", "2"], 1,
         "strength 0.75 starts at step 2 of 4, in stage 1, not start_stage 2; stage 2 takes strengths 0.25 to 0.5"),
        (["--start-stage", "3"], 1, "start_stage 3: the plan has stages 1 to 2"),
    ]:
        img, r = _cpp(cpp_build, sd15_aoti, tmp_path, "--image", ppm, *flags)
        assert r.returncode == code and img is None, r.stdout + r.stderr
        assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    img, r = _cpp(cpp_build, sd15_aoti, tmp_path, "--image", tmp_path / "ids.txt")
    assert r.returncode == 2 and "not a binary PPM (P6) file" in r.stderr and img is None, r.stderr


# ------------------------------------------------------------------------------------------------ ControlNet

@pytest.fixture
def control_engines(sd15_control_aoti) -> tuple[Path, Path]:
    """(engine folder, ControlNet folder 'edges'): tests/conftest.py builds them once a session (the engine tests
    use the same packages)."""
    return sd15_control_aoti


def test_build_records_the_controlnet_by_name(control_engines):
    out, cn = control_engines
    rec = json.loads((out / "models.json").read_text())["models"]["tiny-sd15"]
    assert rec["controlnets"]["edges"]["source"] == str(cn.resolve())
    manifest = json.loads((out / "manifest.json").read_text())
    weights = {e["key"]["weights"] for e in manifest["entries"] if e["key"]["network"] == "controlnet"}
    assert weights == {rec["controlnets"]["edges"]["weights"]}


@pytest.mark.parametrize("extra", [[], ["--control-start", "0.25", "--control-end", "0.75"], ["--no-graphs"]])
def test_controlnet_equals_python(cpp_build, control_engines, tmp_path, extra):
    out, cn = control_engines
    png, ppm = _pictures(tmp_path, "edges", 96, 80, 4)
    control = ["--control-scale", "0.9", *[x for x in extra if x != "--no-graphs"]]
    graphs = [x for x in extra if x == "--no-graphs"]
    cpp, r = _cpp(cpp_build, out, tmp_path, "--controlnet", "edges", "--control-image", ppm, *control, *graphs)
    assert r.returncode == 0, r.stderr
    _close(cpp, _python(out, tmp_path, "--controlnet", cn, "--control-image", png, *control))
    plain, _ = _cpp(cpp_build, out, tmp_path)
    assert np.abs(plain.astype(int) - cpp.astype(int)).max() > 10  # the ControlNet changed the image


def test_controlnet_with_a_photo_and_by_fingerprint(cpp_build, control_engines, tmp_path):
    out, cn = control_engines
    fp = json.loads((out / "models.json").read_text())["models"]["tiny-sd15"]["controlnets"]["edges"]["weights"]
    png, ppm = _pictures(tmp_path, "edges", 64, 64, 5)
    photo_png, photo_ppm = _pictures(tmp_path, "photo", 128, 128, 6)
    cpp, r = _cpp(cpp_build, out, tmp_path, "--controlnet", fp.rsplit(":", 1)[1][:16], "--control-image", ppm, "--image", photo_ppm,
                  "--strength", "0.75")
    assert r.returncode == 0, r.stderr
    _close(cpp, _python(out, tmp_path, "--controlnet", cn, "--control-image", png, "--image", photo_png,
                        "--strength", "0.75"))


def test_controlnet_refusals_name_it_before_any_work(cpp_build, control_engines, tmp_path):
    out, _ = control_engines
    _, ppm = _pictures(tmp_path, "edges", 32, 32, 7)
    img, r = _cpp(cpp_build, out, tmp_path, "--controlnet", "depth", "--control-image", ppm)
    assert r.returncode == 3 and img is None, r.stdout + r.stderr  # MF_ERROR_ENGINE
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"no ControlNet 'depth' for tiny-sd15 in {out} (it has edges); build its engines with: mf-build-engines " \
           "--model tiny-sd15 --stages 128x128:2,256x256:2 --backend aoti --precision fp32 --device cpu" in r.stderr
    img, r = _cpp(cpp_build, out, tmp_path, "--controlnet", "edges", "--control-image", ppm, "--stages",
                  "128x128:2,192x192:2")
    assert r.returncode == 2 and img is None, r.stdout + r.stderr  # MF_ERROR_UNSUPPORTED_SIZE
    assert r.stderr.count("\n") == 1 and "do not cover controlnet 'edges' (dilated) fp32 aoti at 192x192; they " \
        "cover 256x256" in r.stderr and "--controlnet " in r.stderr, r.stderr
    img, r = _cpp(cpp_build, out, tmp_path, "--controlnet", "edges", "--control-image", ppm, "--control-scale", "nan")
    assert r.returncode == 2 and "--control-scale 'nan': expected a finite number" in r.stderr, r.stderr
    img, r = _cpp(cpp_build, out, tmp_path, "--controlnet", "edges", "--control-image", ppm, "--control-start", "0.5",
                  "--control-end", "0.5")
    assert r.returncode == 2 and "control start 0.5 / end 0.5 of controlnet 'edges'" in r.stderr, r.stderr
