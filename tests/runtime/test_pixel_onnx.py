"""IF UNets exported to ONNX (export/if_onnx.py) and run with ONNX Runtime on the CPU, against torch at sizes
other than the traced one (tolerance 1e-4 relative), standard and dilated middle."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.dilation import mid_dilation
from megafusion.core.if_family import TINY_IF
from megafusion.core.if_loading import build_random_if
from megafusion.export.if_onnx import IFUNetWrapper, export_if_unet, if_sample_inputs, if_unet_spec

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle():
    return build_random_if(TINY_IF, seed=5)


@pytest.mark.slow  # three exports: about 30 s of CPU, minutes of wall time on the shared 2 cores
@pytest.mark.parametrize("cascade, dilation, side", [(1, 1, 32), (1, 2, 32), (2, 2, 64)])
def test_onnx_matches_torch(bundle, tmp_path, cascade, dilation, side):
    spec = if_unet_spec(TINY_IF, cascade, "fp32", dilation)
    path = tmp_path / f"{spec.network}-{spec.variant}.onnx"
    result = export_if_unet(bundle, spec, path)
    assert result.files == (path,) and result.bytes > 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [t.name for t in spec.inputs]
    args = if_sample_inputs(spec, 2, side, side, seed=1)
    got = torch.from_numpy(sess.run(None, {t.name: a.numpy() for t, a in zip(spec.inputs, args)})[0])
    unet = bundle.unet_1 if cascade == 1 else bundle.unet_2
    with torch.no_grad(), mid_dilation(unet, dilation):
        ref = IFUNetWrapper(unet)(*args)
    assert got.shape == ref.shape == (2, 6, side, side)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    if dilation > 1:  # the dilation is in the graph: the standard UNet gives something else
        with torch.no_grad():
            plain = IFUNetWrapper(unet)(*args)
        assert ((got - plain).norm() / plain.norm()).item() > 1e-3
