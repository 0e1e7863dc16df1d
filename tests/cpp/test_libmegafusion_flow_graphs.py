"""libmegafusion's SD3 / FLUX step in the step graphs (cpp/src/lib/flow_steps.cpp): with graphs on (the default)
each stage's steps run through the buffered Euler step, sigmas and timesteps read from device tables by a device
step counter; on CUDA it is captured once per descriptor and replayed, on the CPU it runs eagerly, uncaptured.

Tolerances: on the CPU the buffered step is the plain loop's ATen ops on the same float32 values (a sigma read
from a tensor instead of a host scalar multiplies the same), so the images are equal (0 levels of 255), for both
families and both relays, in one context that switches back and forth (the buffers are refilled, not stale). On
CUDA (the @gpu test, not run on the CPU CI) within 2 levels, as the UNet's graphs test allows
(tests/cpp/test_libmegafusion_graphs.py GRAPH_TOL), and the counters: one capture per stage descriptor, one replay
per step.

On the session's folders and library (tests/conftest.py flux_aoti, sd3_aoti, flux_control_aoti, cpp_build), as
test_libmegafusion_flow.py and test_libmegafusion_flow_control.py: no build of its own.
"""
from __future__ import annotations

import numpy as np
import pytest

from megafusion.cli import build_engines as build_cli
from megafusion.core.loading import load_model
from megafusion.core.plan import parse_stages

from tests.conftest import FLUX_CONTROL_STAGES

from .test_libmegafusion_flow import PROMPT, SEED, STAGES, _ids, flow_folders  # noqa: F401 (fixture)
from .test_libmegafusion_flow_control import END, START, control  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

GRAPH_TOL = 2
"""Largest allowed difference per channel between graphed and plain runs on CUDA, in levels of 255."""


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _run(lib, ctx, model: str, relay: str, graphs: bool) -> np.ndarray:
    fam = load_model(model).family
    lib.set_graphs(ctx, graphs)
    neg = _ids(model, "") if fam.cfg else None  # SD3: CFG on the empty negative prompt
    rc, image = lib.generate(ctx, STAGES[model], SEED, fam.default_guidance, _ids(model, PROMPT), neg, relay)
    assert rc == 0, image
    return image


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_flow_graphs_on_equal_off_on_cpu(lib, flow_folders, model):
    rc, ctx = lib.open(flow_folders[model], model)
    assert rc == 0, lib.error()
    try:
        images = {}
        for relay in ("pixel", "latent"):
            on = _run(lib, ctx, model, relay, True)
            off = _run(lib, ctx, model, relay, False)
            assert on.std() > 5  # a real image
            assert _max_diff(on, off) == 0, relay
            images[relay] = on
        assert _max_diff(images["pixel"], images["latent"]) > 10  # the relays differ: the buffers were reloaded
        assert lib.counters(ctx) == (0, 0)  # the CPU captures nothing
    finally:
        lib.lib.mf_context_destroy(ctx)


def test_flow_controlled_graphs_on_equal_off_on_cpu(lib, flux_control_aoti, control):
    """A ControlNet's scale table and images are buffers kept across generations: a second scale in the same
    context gives its own image (refilled, not stale), graphs on equal to off for each."""
    ids = _ids("tiny-flux", PROMPT)
    rc, ctx = lib.open(flux_control_aoti[0], "tiny-flux")
    assert rc == 0, lib.error()
    try:
        images = []
        for scale in (0.8, 0.3):
            pair = []
            for graphs in (True, False):
                lib.set_graphs(ctx, graphs)
                rc, image = lib.generate(ctx, FLUX_CONTROL_STAGES, SEED, 3.5, ids,
                                         controls=(("edges", control[0], scale, START, END),))
                assert rc == 0, image
                pair.append(image)
            assert _max_diff(*pair) == 0, scale
            images.append(pair[0])
        assert _max_diff(*images) > 0  # the second scale was read
    finally:
        lib.lib.mf_context_destroy(ctx)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_flow_graphs_count_and_match_on_cuda(lib, tmp_path, model):
    """fp32 packages built for the GPU: one capture per stage size (both stages differ), one replay per step,
    captured once for two generations; the graphed image within GRAPH_TOL of the plain loop's, both relays. Then
    the progress callback on replays (the stream synchronized before each call): every step in order, the same
    image (within GRAPH_TOL), and a stop at step 2 (MF_ERROR_CANCELLED)."""
    folder = tmp_path / "engines"
    assert build_cli.main(["--model", model, "--backend", "aoti", "--stages", STAGES[model], "--device", "cuda",
                           "--precision", "fp32", "--output", str(folder)]) == 0
    stages = parse_stages(STAGES[model])
    descriptors = len({(s.height, s.width) for s in stages})
    steps = sum(s.steps for s in stages)
    rc, ctx = lib.open(folder, model, "cuda")
    assert rc == 0, lib.error()
    try:
        for n, relay in enumerate(("pixel", "latent"), 1):
            on = _run(lib, ctx, model, relay, True)
            assert lib.counters(ctx) == (descriptors, n * steps), relay
            off = _run(lib, ctx, model, relay, False)
            assert lib.counters(ctx) == (descriptors, n * steps), relay  # graphs off: nothing counted
            assert on.std() > 5 and _max_diff(on, off) <= GRAPH_TOL, relay
        fam, seen = load_model(model).family, []
        lib.set_graphs(ctx, True)
        neg = _ids(model, "") if fam.cfg else None
        args = (ctx, STAGES[model], SEED, fam.default_guidance, _ids(model, PROMPT), neg, "latent")
        rc, image = lib.generate(*args, progress=lambda s, t: seen.append((s, t)) or 0)
        assert rc == 0 and _max_diff(image, on) <= GRAPH_TOL, image  # the same graphs, replayed again
        assert seen == [(s, steps) for s in range(1, steps + 1)]
        rc, err = lib.generate(*args, progress=lambda s, t: int(s == 2))
        assert rc == 6 and "after step 2 of" in err, (rc, err)
    finally:
        lib.lib.mf_context_destroy(ctx)
