"""Fixtures of the C API tests that go through ctypes (tests/cpp/flow_capi.py)."""
from __future__ import annotations

import pytest

from .flow_capi import Library


@pytest.fixture(scope="module")
def lib(cpp_build) -> Library:
    """libmegafusion of the session's CMake build (tests/conftest.py `cpp_build`), loaded through ctypes."""
    return Library(next(cpp_build.rglob("libmegafusion.so")))
