"""Fixtures of the CLI tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def no_model_load(monkeypatch):
    """The model loader replaced by one that fails the test: bad input must be refused before any load."""
    def load_model(*a, **kw):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("megafusion.core.loading.load_model", load_model)
