"""libmegafusion's ControlNets on SD3 and FLUX (issues #17, #18; cpp/src/lib/flow_control.cpp): a ControlNet added
with mf_inputs_add_control by the name models.json records runs as `mf-generate --engines DIR --controlnet DIR
--control-image IMG --control-scale S --control-start A --control-end B` runs it (runtime/flow_controlnet_engines.py:
the control image resized to each stage's size, VAE-encoded there, the scale times the window per global step, the
ControlNet's and the controlled transformer's packages). Bad input is one line naming it, before any network runs.

Tolerance: the C API's image within 1 level of 255 of Python's (IMAGE_TOL, as the other C API tests): the same ops
on the same packages, except that Python runs the text encoders and VAE in torch where the C API runs their
packages (float32 rounding, well under one level), and a value at a rounding edge may land one level apart.

On the session's folders (tests/conftest.py flux_control_aoti, sd3_control_aoti): each holds one stage shape's
ControlNet and controlled-transformer packages (two compiles per family, in the background).
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megafusion.cli import build_engines as build_cli
from megafusion.cli import generate as gen_cli
from megafusion.core.loading import load_model
from tests.conftest import FLUX_CONTROL_STAGES, SD3_CONTROL_STAGES

from .flow_capi import Library
from .test_libmegafusion import IMAGE_TOL
from .test_libmegafusion_flow import PROMPT, SEED, _ids

pytestmark = pytest.mark.slow

MF_ERROR_INVALID_ARGUMENT, MF_ERROR_UNSUPPORTED_SIZE, MF_ERROR_ENGINE = 1, 2, 3
STAGES = {"tiny-flux": FLUX_CONTROL_STAGES, "tiny-sd3": SD3_CONTROL_STAGES}
# Scale and window: 0.75 ends the control before the last of the plan's 4 global steps (keep(3) = 0).
SCALE, START, END = 0.8, 0.0, 0.75


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> tuple[np.ndarray, Path]:
    """Edges-like stripes at 112x96 (WxH), neither stage's size nor aspect (each stage's resize does work), as an
    array and as the PNG mf-generate reads (lossless: the same bytes)."""
    y, x = np.mgrid[0:96, 0:112]
    rgb = np.where(((x // 8 + y // 12) % 2 == 0)[..., None], 230, 20).astype(np.uint8).repeat(3, -1)
    rgb[..., 1] = np.clip(x * 2, 0, 255)
    path = tmp_path_factory.mktemp("control") / "edges.png"
    Image.fromarray(rgb).save(path)
    return rgb, path


def _generate(lib: Library, folder: Path, model: str, stages: str | None = None, **kw):
    """The C API's image (or (status, message)) of test_libmegafusion_flow.py's prompt, at the model's plan."""
    fam = load_model(model).family
    rc, ctx = lib.open(folder, model)
    assert rc == 0, lib.error()
    try:
        neg = _ids(model, "") if fam.cfg else None  # SD3 with CFG encodes the empty negative prompt
        return lib.generate(ctx, stages or STAGES[model], SEED, fam.default_guidance, _ids(model, PROMPT), neg, **kw)
    finally:
        lib.lib.mf_context_destroy(ctx)


def _python(model: str, folder: Path, cn: Path, image: Path, out: Path, *flags) -> np.ndarray:
    assert gen_cli.main(["--model", model, "--engines", str(folder), "--stages", STAGES[model], "--prompt", PROMPT,
                         "--seed", str(SEED), "--no-progress", "--output", str(out), "--controlnet", str(cn),
                         "--control-image", str(image), "--control-scale", str(SCALE), "--control-start",
                         str(START), "--control-end", str(END), *map(str, flags)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


# One test per family, each naming its build as a fixture: tests/conftest.py queues the builds the collected
# tests name (a build looked up inside a test is made only when asked for, and the test waits for it).
def test_flux_controlnet_equals_python(lib, flux_control_aoti, control, tmp_path):
    _check_equals_python(lib, "tiny-flux", *flux_control_aoti, control, tmp_path)


def test_sd3_controlnet_equals_python(lib, sd3_control_aoti, control, tmp_path):
    _check_equals_python(lib, "tiny-sd3", *sd3_control_aoti, control, tmp_path)


def _check_equals_python(lib, model, folder, cn, control, tmp_path):
    rgb, path = control
    rc, cpp = _generate(lib, folder, model, controls=(("edges", rgb, SCALE, START, END),))
    assert rc == 0, cpp
    py = _python(model, folder, cn, path, tmp_path / "py.png", "--device", "cpu")
    assert cpp.shape == py.shape and py.std() > 5  # a real image, not two blank ones
    diff = np.abs(cpp.astype(int) - py.astype(int))
    assert diff.max() <= IMAGE_TOL, (diff.max(), diff.mean())
    rc, plain = _generate(lib, folder, model)  # the ControlNet acts: the same seed without it differs
    assert rc == 0, plain
    assert np.abs(cpp.astype(int) - plain.astype(int)).max() > 10


def test_flow_controlnet_with_a_photo_equals_python(lib, flux_control_aoti, control, tmp_path):
    """Image to image and a ControlNet together: the photo (the control picture itself) enters stage 2's first
    step, so the scale table is read at the global steps 2 and 3 (the skipped steps keep their places; keep(3) = 0
    with END 0.75)."""
    folder, cn = flux_control_aoti
    rgb, path = control
    photo = np.ascontiguousarray(rgb[::-1])  # upside down: not the control image
    photo_path = tmp_path / "photo.png"
    Image.fromarray(photo).save(photo_path)
    rc, cpp = _generate(lib, folder, "tiny-flux", init=(photo, 0.0, 2), controls=(("edges", rgb, SCALE, START, END),))
    assert rc == 0, cpp
    py = _python("tiny-flux", folder, cn, path, tmp_path / "py.png", "--device", "cpu", "--image", photo_path,
                 "--start-stage", "2")
    assert cpp.shape == py.shape and py.std() > 5
    diff = np.abs(cpp.astype(int) - py.astype(int))
    assert diff.max() <= IMAGE_TOL, (diff.max(), diff.mean())


def test_bad_flow_control_input_is_one_line(lib, flux_control_aoti, control):
    folder, cn = flux_control_aoti
    rgb, _ = control
    empty = np.zeros((0, 0, 3), np.uint8)
    cases = [
        (dict(controls=(("nope", rgb, 1.0, 0.0, 1.0),)), MF_ERROR_ENGINE,
         f"no ControlNet 'nope' for tiny-flux in {folder} (it has edges); build its engines with: "
         f"mf-build-engines --model tiny-flux"),
        (dict(controls=(("edges", empty, 1.0, 0.0, 1.0),)), MF_ERROR_INVALID_ARGUMENT,
         "control image of controlnet 'edges'"),
        (dict(controls=(("edges", rgb, float("inf"), 0.0, 1.0),)), MF_ERROR_INVALID_ARGUMENT,
         "control scale inf of controlnet 'edges': must be a finite number"),
        (dict(controls=(("edges", rgb, 1.0, 0.6, 0.4),)), MF_ERROR_INVALID_ARGUMENT,
         "control start 0.6 / end 0.4 of controlnet 'edges': need 0 <= start < end <= 1"),
        (dict(controls=(("edges", rgb, 1.0, 0.0, 1.5),)), MF_ERROR_INVALID_ARGUMENT,
         "control start 0 / end 1.5 of controlnet 'edges': need 0 <= start < end <= 1"),
    ]
    for kw, code, message in cases:
        rc, err = _generate(lib, folder, "tiny-flux", **kw)
        assert rc == code and message in err and "\n" not in err, (message, rc, err)


def test_stage_without_control_packages_names_the_build(lib, flux_control_aoti, control):
    """The 128x128 stage has a plain transformer package in the folder but no ControlNet one: refused before any
    network runs, naming the command that builds it with the ControlNet's folder."""
    folder, cn = flux_control_aoti
    rgb, _ = control
    rc, err = _generate(lib, folder, "tiny-flux", "128x128:2,160x160:2", controls=(("edges", rgb, 1.0, 0.0, 1.0),))
    assert rc == MF_ERROR_UNSUPPORTED_SIZE and "\n" not in err, err
    assert "no tiny-flux controlnet 'edges' package" in err and "the 128x128 stage" in err, err
    command = shlex.split(err.split("Build them with: ")[1])
    assert command[:3] == ["mf-build-engines", "--model", "tiny-flux"], command
    assert command[command.index("--stages") + 1] == "128x128:2,160x160:2", command
    assert command[command.index("--controlnet") + 1] == str(cn.resolve()), command


@pytest.mark.parametrize("change, code, message", [
    (lambda rec: rec.update(hint_block=True), MF_ERROR_INVALID_ARGUMENT,
     "controlnet 'edges' has a pixel hint block (XLabs' FLUX kind), which libmegafusion does not run yet"),
    (lambda rec: rec.pop("outputs"), MF_ERROR_ENGINE,
     "records no outputs of controlnet 'edges' (built before it recorded them); rebuild with: mf-build-engines"),
])
def test_controlnet_record_it_cannot_run_is_one_line(lib, flux_control_aoti, control, tmp_path, change, code, message):
    """models.json's record of the net, changed in a copy of the folder's two JSON files (the refusal comes before
    any package is opened): an XLabs-kind net, and a record without the outputs (a folder built before them)."""
    folder, _ = flux_control_aoti
    rgb, _ = control
    for name in ("manifest.json", "models.json"):
        shutil.copy(folder / name, tmp_path / name)
    facts = json.loads((tmp_path / "models.json").read_text())
    change(facts["models"]["tiny-flux"]["controlnets"]["edges"])
    (tmp_path / "models.json").write_text(json.dumps(facts))
    rc, err = _generate(lib, tmp_path, "tiny-flux", controls=(("edges", rgb, 1.0, 0.0, 1.0),))
    assert rc == code and message in err and "\n" not in err, err


@pytest.mark.gpu
def test_flow_controlnet_on_cuda_equals_python(lib, control, tmp_path):
    """The same on CUDA (tiny-flux fp32 packages built for the GPU; runs where CUDA is, e.g. the lent H200)."""
    from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet

    rgb, path = control
    cn = save_tiny_flow_controlnet(load_model("tiny-flux").family, tmp_path / "edges", seed=1)
    folder = tmp_path / "engines"
    assert build_cli.main(["--model", "tiny-flux", "--backend", "aoti", "--stages", FLUX_CONTROL_STAGES, "--device",
                           "cuda", "--precision", "fp32", "--controlnet", str(cn), "--output", str(folder)]) == 0
    rc, ctx = lib.open(folder, "tiny-flux", "cuda")
    assert rc == 0, lib.error()
    try:
        rc, cpp = lib.generate(ctx, FLUX_CONTROL_STAGES, SEED, 3.5, _ids("tiny-flux", PROMPT),
                               controls=(("edges", rgb, SCALE, START, END),))
        assert rc == 0, cpp
    finally:
        lib.lib.mf_context_destroy(ctx)
    py = _python("tiny-flux", folder, cn, path, tmp_path / "py.png", "--device", "cuda", "--dtype", "fp32")
    assert np.abs(cpp.astype(int) - py.astype(int)).max() <= IMAGE_TOL
