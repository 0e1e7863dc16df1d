"""libmegafusion's whole-step CUDA graphs (cpp/src/lib/step_graphs.cpp) on the GPU: one capture per stage
descriptor, one replay per step, and the graphed image within 2 levels of the same library with graphs off and of
the Python runtime's graphed denoise on the same packages.

Builds libmegafusion with CUDA (nvcc and a CUDA torch) and tiny-sd15 AOTInductor packages on the GPU; skipped
without CUDA (tests/conftest.py) or without nvcc.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from megafusion.runtime.pipeline import GenerationOptions

from ..conftest import AOTI_STAGES

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

GRAPH_TOL = 2
"""Largest allowed difference per channel between graphed and plain runs, in levels of 255."""
COUNTERS = re.compile(r"graphs (on|off), (\d+) captures, (\d+) replays")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def _cpp(build: Path, engines: Path, opts: GenerationOptions, tmp: Path, *flags: str) -> tuple[np.ndarray, tuple]:
    from PIL import Image

    from megafusion.runtime.tokens import format_ids, load_tokenizers

    ids = tmp / "ids.txt"
    ids.write_text(format_ids("tiny-sd15", load_tokenizers("tiny-sd15"), opts.prompt, opts.negative_prompt))
    png = tmp / f"cpp{''.join(flags)}.png"
    r = _run([build / "cpp" / "mf-generate-cpp", "--engines", engines, "--model", "tiny-sd15", "--ids", ids,
              "--stages", AOTI_STAGES, "--seed", opts.seed, "--guidance", opts.guidance, "--device", "cuda",
              "--repeats", 2, "--output", png, *flags])
    assert r.returncode == 0, r.stderr
    m = COUNTERS.search(r.stdout)
    assert m is not None, r.stdout
    return np.asarray(Image.open(png).convert("RGB")), (m.group(1), int(m.group(2)), int(m.group(3)))


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("guidance", [7.0, 1.0])  # CFG on (batch 2) and off (batch 1): two descriptor kinds
def test_cpp_graphs_count_and_match(cuda_build, sd15_aoti_cuda, tmp_path, guidance):
    from megafusion.core.plan import parse_stages, validate_plan
    from megafusion.core.loading import load_model

    opts = GenerationOptions("a red cube", negative_prompt="blurry", guidance=guidance, seed=3)
    graphed, (on, captures, replays) = _cpp(cuda_build, sd15_aoti_cuda, opts, tmp_path)
    plain, (off, captures_off, replays_off) = _cpp(cuda_build, sd15_aoti_cuda, opts, tmp_path, "--no-graphs")
    plan = validate_plan(load_model("tiny-sd15").family, parse_stages(AOTI_STAGES))
    descriptors = {(s.width, s.height, k > 0) for k, s in enumerate(plan.stages)}  # size, dilated; one CFG setting
    steps = sum(s.steps for s in plan.stages)
    assert (on, captures, replays) == ("on", len(descriptors), 2 * steps)  # two generations: captured once
    assert (off, captures_off, replays_off) == ("off", 0, 0)
    assert graphed.std() > 5  # a real image
    assert _max_diff(graphed, plain) <= GRAPH_TOL


def test_cpp_graphs_match_python_graphs(cuda_build, sd15_aoti_cuda, tmp_path):
    import torch

    from megafusion.core.loading import load_model
    from megafusion.core.plan import parse_stages, validate_plan
    from megafusion.engine.load import open_engines
    from megafusion.runtime.pipeline import MegaFusionPipeline

    opts = GenerationOptions("a red cube", negative_prompt="blurry", seed=4)
    graphed, _ = _cpp(cuda_build, sd15_aoti_cuda, opts, tmp_path)
    bundle = load_model("tiny-sd15")
    plan = validate_plan(bundle.family, parse_stages(AOTI_STAGES))
    dev = torch.device("cuda")
    nets, _ = open_engines(sd15_aoti_cuda, bundle, plan, device=dev, backend="aoti")
    py = MegaFusionPipeline.fast(bundle, nets, dev).generate(plan, opts).image
    assert _max_diff(graphed, py) <= GRAPH_TOL
