"""`Backend.export` picks the file format of the backend for a condition network's export (ControlNet, IP UNet,
image encoder): no backend-name branches at the call sites."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from megafusion.engine.backend import BackendUnavailable, NetworkExport, backend_names, get_backend


def _recording(calls: list):
    return NetworkExport(aoti=lambda path, ctx: calls.append(("aoti", path, ctx)) or "package",
                         onnx=lambda path: calls.append(("onnx", path)) or "model")


def test_each_backend_writes_its_own_format(tmp_path):
    calls: list = []
    assert get_backend("aoti").export(_recording(calls), tmp_path, "cpu") == "package"
    assert get_backend("onnxruntime").export(_recording(calls), tmp_path, "cpu") == "model"
    # on the CPU no attention-kernel context: cuDNN's attention is a CUDA choice
    assert calls == [("aoti", Path(tmp_path) / "model.pt2", contextlib.nullcontext), ("onnx", tmp_path / "model.onnx")]


def test_a_backend_without_condition_exports_says_so(tmp_path):
    others = [n for n in backend_names() if n not in ("aoti", "onnxruntime")]
    assert others  # torch and tensorrt at least
    for name in others:
        with pytest.raises(BackendUnavailable, match=name):
            get_backend(name).export(_recording([]), tmp_path, "cpu")


def test_a_backend_without_exports_opens_none_and_says_so(tmp_path):
    for name in (n for n in backend_names() if n not in ("aoti", "onnxruntime")):
        assert not get_backend(name).one_engine_per_shape
        with pytest.raises(BackendUnavailable, match=name):
            get_backend(name).open_file(tmp_path / "model", None, "cpu")


def test_static_packages_are_one_engine_per_shape():
    # the IF builds split their profiles on this, and open a dispatch by shape over what they built
    assert get_backend("aoti").one_engine_per_shape and not get_backend("onnxruntime").one_engine_per_shape
