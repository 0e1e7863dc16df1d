"""IF UNet engines (engine/if_engines.py) on tiny-if, CPU: built into the content-addressed folder, opened as
IFEngineNetworks, each engine against its torch module per call (1e-4 relative, as tests/runtime/test_pixel_onnx.py),
and the pixel pipeline on engines against the torch modules (5e-3 relative on the sample: DDPM sampling with
thresholding magnifies the engines' rounding, measured 7e-4 for ONNX Runtime and 1.5e-3 for AOTInductor)."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.if_family import TINY_IF
from megafusion.core.if_loading import build_random_if
from megafusion.core.plan import Stage
from megafusion.engine.cache import EngineError
from megafusion.engine.if_engines import build_if_engines, if_requirements, open_if_engines
from megafusion.engine.if_networks import IFTorchNetworks
from megafusion.runtime.pixel_pipeline import IFMegaFusionPipeline, PixelOptions, pixel_plan

pytestmark = pytest.mark.usefixtures("one_thread")

PLANS = {1: pixel_plan(TINY_IF, 1, [Stage(16, 16, 3), Stage(32, 32, 2)]),
         2: pixel_plan(TINY_IF, 2, [Stage(64, 64, 2), Stage(128, 128, 1)])}
CALL_REL, SAMPLE_REL = 1e-4, 5e-3


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def bundle():
    return build_random_if(TINY_IF, seed=6)


@pytest.fixture(scope="module")
def ort_folder(bundle, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("if-ort")
    assert build_if_engines(bundle, PLANS, "onnxruntime", "fp32", out) == 4
    assert build_if_engines(bundle, PLANS, "onnxruntime", "fp32", out) == 0  # all present and valid
    return out


def _call_inputs(cascade, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = 3 if cascade == 1 else 6
    labels = torch.full((2,), 250, dtype=torch.int64) if cascade == 2 else None
    return (torch.randn(2, channels, side, side, generator=g), torch.tensor(981),
            torch.randn(2, 77, 32, generator=g), labels)


def test_requirements_per_backend():
    ort = if_requirements(TINY_IF, PLANS, "fp32", 2, "onnxruntime")
    assert [(r.spec.network, r.spec.dilation, len(r.profiles)) for r in ort] == [
        ("unet_I", 1, 1), ("unet_I", 2, 1), ("unet_II", 1, 1), ("unet_II", 2, 1)]
    same_size = {1: pixel_plan(TINY_IF, 1, [Stage(16, 16, 3), Stage(16, 16, 2), Stage(32, 32, 2)])}
    aoti = if_requirements(TINY_IF, same_size, "fp32", 2, "aoti")
    sides = [(r.spec.dilation, r.profiles[0].shapes[0][1]) for r in aoti]
    assert sides == [(1, (2, 3, 16, 16)), (2, (2, 3, 16, 16)), (2, (2, 3, 32, 32))]  # one static package per shape


@pytest.mark.parametrize("cascade, dilation, side", [(1, 1, 16), (1, 2, 32), (2, 1, 64), (2, 2, 128)])
def test_onnxruntime_engine_matches_its_module(bundle, ort_folder, cascade, dilation, side):
    nets = open_if_engines(ort_folder, bundle, "cpu")
    assert nets.backend == "onnxruntime" and not nets.capturable
    args = _call_inputs(cascade, side)
    got = nets.unet(cascade, *args, dilation)
    ref = IFTorchNetworks(bundle).unet(cascade, *args, dilation)
    assert got.shape == ref.shape == (2, 6, side, side) and got.dtype == torch.float32
    assert _rel(got, ref) < CALL_REL


def test_pipeline_on_onnxruntime_engines(bundle, ort_folder):
    opts = PixelOptions("a red fox", seed=3)
    ref = IFMegaFusionPipeline(bundle).generate(PLANS[1], PLANS[2], opts)
    nets = open_if_engines(ort_folder, bundle, "cpu", precision="fp32")
    eager = IFMegaFusionPipeline(bundle, networks=nets).generate(PLANS[1], PLANS[2], opts)
    graphed = IFMegaFusionPipeline(bundle, mode="graphs", networks=nets).generate(PLANS[1], PLANS[2], opts)
    assert torch.equal(graphed.sample_2, eager.sample_2)
    assert _rel(eager.sample_1, ref.sample_1) < SAMPLE_REL and _rel(eager.sample_2, ref.sample_2) < SAMPLE_REL


def test_refusals(bundle, ort_folder, tmp_path):
    other = build_random_if(TINY_IF, seed=7)
    with pytest.raises(EngineError, match="built from other weights"):
        open_if_engines(ort_folder, other, "cpu")
    with pytest.raises(EngineError, match="holds no tiny-if UNet engines for cpu in fp16"):
        open_if_engines(ort_folder, bundle, "cpu", precision="fp16")
    with pytest.raises(ValueError, match="backend 'tensorrt' builds no IF engines"):
        build_if_engines(bundle, PLANS, "tensorrt", "fp32", tmp_path)


@pytest.mark.slow  # one AOTInductor compile of a tiny UNet: about 65 s on the shared CPU
def test_aoti_package_matches_its_module_and_serves_its_shape_only(bundle, tmp_path):
    plan = {1: pixel_plan(TINY_IF, 1, [Stage(16, 16, 3)])}
    assert build_if_engines(bundle, plan, "aoti", "fp32", tmp_path) == 1
    nets = open_if_engines(tmp_path, bundle, "cpu")
    assert nets.backend == "aoti" and nets.capturable
    args = _call_inputs(1, 16)
    assert _rel(nets.unet(1, *args, 1), IFTorchNetworks(bundle).unet(1, *args, 1)) < CALL_REL
    opts = PixelOptions("a red fox", seed=3)
    ref = IFMegaFusionPipeline(bundle).generate(plan[1], None, opts)
    ours = IFMegaFusionPipeline(bundle, mode="graphs", networks=nets).generate(plan[1], None, opts)
    assert _rel(ours.sample_1, ref.sample_1) < SAMPLE_REL
    with pytest.raises(ValueError, match="no engine takes the shapes"):
        nets.unet(1, *_call_inputs(1, 32), 1)


@pytest.mark.gpu
def test_aoti_packages_captured_in_the_pixel_graphs_on_cuda(tmp_path):
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        bundle = build_random_if(TINY_IF, 6, "cuda", torch.float32)
        assert build_if_engines(bundle, {1: PLANS[1]}, "aoti", "fp32", tmp_path, device="cuda") == 2
        nets = open_if_engines(tmp_path, bundle, "cuda")
        opts = PixelOptions("a red fox", seed=3)
        ref = IFMegaFusionPipeline(bundle, "cuda").generate(PLANS[1], None, opts)
        pipe = IFMegaFusionPipeline(bundle, "cuda", "graphs", networks=nets)
        ours = pipe.generate(PLANS[1], None, opts)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    assert pipe.graphs.captures == 2 and pipe.graphs.replays == sum(s.steps for s in PLANS[1].stages)
    assert _rel(ours.sample_1.cpu(), ref.sample_1.cpu()) < SAMPLE_REL
