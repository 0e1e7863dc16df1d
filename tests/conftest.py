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
