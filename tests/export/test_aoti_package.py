"""export/aoti_export.package_exported, which every AOTInductor export (UNet, ControlNet, IF, SD3/FLUX transformer,
their ControlNets, text encoders and VAE) goes through: a failure is one ExportError naming what was exported,
and nothing is left at the package's path. (Successful packages are checked by the engine tests.)"""
from __future__ import annotations

import time

import pytest

from megafusion.export.aoti_export import package_exported
from megafusion.export.onnx_export import ExportError


def test_a_failing_trace_is_one_error_naming_the_network(tmp_path):
    def trace():
        raise RuntimeError("unsupported operator aten::boom")

    path = tmp_path / "sub" / "transformer.pt2"
    with pytest.raises(ExportError) as err:
        package_exported(trace, path, "transformer at latent 64x48", time.perf_counter())
    msg = str(err.value)
    assert msg == ("AOTInductor export of transformer at latent 64x48 failed: RuntimeError: unsupported operator "
                   "aten::boom"), msg
    assert isinstance(err.value.__cause__, RuntimeError)  # the cause stays chained for a debugger
    assert not path.exists()


def test_an_export_error_passes_through_unwrapped(tmp_path):
    def trace():
        raise ExportError("controlnet: ControlNet packages are static per stage shape")

    with pytest.raises(ExportError, match=r"^controlnet: ControlNet packages are static"):
        package_exported(trace, tmp_path / "c.pt2", "controlnet", time.perf_counter())
