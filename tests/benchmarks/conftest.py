"""Meta-device cost counters, built once per session (counting is fast, building diffusers modules is not)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sd15_counter():
    from megafusion.benchmarks.flops import MetaCostCounter
    from megafusion.core.families import SD15

    return MetaCostCounter(SD15)


@pytest.fixture(scope="session")
def sdxl_counter():
    from megafusion.benchmarks.flops import MetaCostCounter
    from megafusion.core.families import SDXL

    return MetaCostCounter(SDXL)
