"""Engine folders built once per session (tiny models, ONNX Runtime, fp32, a 128 -> 256 two-stage plan)."""
from __future__ import annotations

import shutil

import pytest

STAGES = "128x128:2,256x256:2"
"""The small plan every engine test builds for: latent 16 then 32, two steps each."""


def build(bundle, out, backend="onnxruntime", stages=STAGES, **kw):
    from megafusion.engine.build import BuildRequest, build_engines
    from megafusion.export.plan import parse_stages, validate_plan

    plan = validate_plan(bundle.family, parse_stages(stages))
    return build_engines(bundle, BuildRequest(plan, backend, kw.pop("precision", "fp32"), out, **kw))


@pytest.fixture(scope="session")
def sdxl_engines(tmp_path_factory, tiny_sdxl):
    out = tmp_path_factory.mktemp("engines-sdxl")
    build(tiny_sdxl, out)
    return out


@pytest.fixture(scope="session")
def sd15_engines(tmp_path_factory, tiny_sd15):
    out = tmp_path_factory.mktemp("engines-sd15")
    build(tiny_sd15, out)
    return out


@pytest.fixture
def sdxl_copy(sdxl_engines, tmp_path):
    """A private copy of the built folder, for tests that damage it."""
    dst = tmp_path / "engines"
    shutil.copytree(sdxl_engines, dst)
    return dst
