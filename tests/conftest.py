"""Shared fixtures: tiny models on CPU, built once per session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU tests run on the H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd15():
    from megafusion.export.loading import load_model

    return load_model("tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from megafusion.export.loading import load_model

    return load_model("tiny-sdxl")


AOTI_STAGES = "128x128:2,256x256:2"
"""The plan the AOTInductor packages are built for (one package per network serves 128 to 256 px sides)."""


@pytest.fixture(scope="session")
def sd15_aoti(tmp_path_factory):
    """tiny-sd15 engines from `mf-build-engines --backend aoti` (engine and C++ library tests share them)."""
    from megafusion.engine.cli import main as build_main

    out = tmp_path_factory.mktemp("engines-aoti")
    assert build_main(["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "aoti", "--device", "cpu",
                       "--output", str(out)]) == 0
    return out
