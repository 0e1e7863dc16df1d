"""The pixel pipeline's graphed step (runtime/pixel_graphs.py) and its modes, on tiny-if.

CPU: the buffered step (what a graph captures) runs eagerly and must equal the eager loop bit for bit, noise
drawn up front included; the bookkeeping (one buffer set per stage descriptor, nothing captured) is checked.
GPU (`gpu` mark): one capture per descriptor, one replay per step, the image within 1e-3 of eager.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.if_family import TINY_IF
from megafusion.core.if_loading import build_random_if
from megafusion.core.plan import Stage
from megafusion.runtime.pixel_graphs import PixelGraphKey
from megafusion.runtime.pixel_pipeline import IFMegaFusionPipeline, PixelOptions, pixel_plan

pytestmark = pytest.mark.usefixtures("one_thread")

PLAN_1 = [Stage(16, 16, 4), Stage(32, 32, 3)]
PLAN_2 = [Stage(64, 64, 3), Stage(128, 128, 2)]
KEYS = {PixelGraphKey(1, 2, 16, 16, 1), PixelGraphKey(1, 2, 32, 32, 2),
        PixelGraphKey(2, 2, 64, 64, 1), PixelGraphKey(2, 2, 128, 128, 2)}


@pytest.fixture(scope="module")
def bundle():
    return build_random_if(TINY_IF, seed=4)


def _plans():
    return pixel_plan(TINY_IF, 1, PLAN_1), pixel_plan(TINY_IF, 2, PLAN_2)


@pytest.mark.parametrize("g1, g2", [(7.0, 4.0), (1.0, 1.0)])
def test_graphs_mode_on_cpu_equals_eager_bit_for_bit(bundle, g1, g2):
    opts = PixelOptions("a red fox", "blurry", guidance_1=g1, guidance_2=g2, seed=3)
    eager = IFMegaFusionPipeline(bundle).generate(*_plans(), opts)
    pipe = IFMegaFusionPipeline(bundle, mode="graphs")
    graphed = pipe.generate(*_plans(), opts)
    assert torch.equal(graphed.sample_1, eager.sample_1) and torch.equal(graphed.sample_2, eager.sample_2)
    assert eager.sample_2.abs().max() > 0.5  # a real sample
    batch = 2 if g1 > 1 else 1
    assert set(pipe.graphs.buffers) == {PixelGraphKey(k.cascade, batch, k.height, k.width, k.dilation) for k in KEYS}
    assert pipe.graphs.captures == 0 and pipe.graphs.replays == 0 and not pipe.graphs.graphs  # nothing captured on CPU


def test_buffers_reused_and_grown_for_a_longer_stage(bundle):
    pipe = IFMegaFusionPipeline(bundle, mode="graphs")
    opts = PixelOptions("a fox", seed=1)
    first = pipe.generate(*_plans(), opts)
    held = {k: b.x for k, b in pipe.graphs.buffers.items()}
    again = pipe.generate(*_plans(), opts)
    assert torch.equal(again.sample_2, first.sample_2)  # buffers left by the first run change nothing
    assert all(pipe.graphs.buffers[k].x is x for k, x in held.items())  # same buffers: graphs would be reused
    longer = pixel_plan(TINY_IF, 1, [Stage(16, 16, 9), Stage(32, 32, 3)])
    eager = IFMegaFusionPipeline(bundle).generate(longer, None, opts)
    graphed = pipe.generate(longer, None, opts)
    assert torch.equal(graphed.sample_1, eager.sample_1)
    key = PixelGraphKey(1, 2, 16, 16, 1)
    assert pipe.graphs.buffers[key].noise.shape[0] == 9 and pipe.graphs.buffers[key].x is not held[key]


def test_modes_are_checked(bundle):
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        IFMegaFusionPipeline(bundle, mode="fast")
    from megafusion.engine.if_networks import IFTorchNetworks

    with pytest.raises(ValueError, match="mode 'compiled' compiles the bundle's modules"):
        IFMegaFusionPipeline(bundle, mode="compiled", networks=IFTorchNetworks(bundle))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graphs", "compiled"])
def test_graphs_captured_once_per_descriptor_and_replayed_every_step(mode):
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        bundle = build_random_if(TINY_IF, 4, "cuda", torch.float32)
        opts = PixelOptions("a red fox", seed=3)
        eager = IFMegaFusionPipeline(bundle, "cuda").generate(*_plans(), opts)
        pipe = IFMegaFusionPipeline(bundle, "cuda", mode)
        first = pipe.generate(*_plans(), opts)
        assert set(pipe.graphs.graphs) == KEYS and pipe.graphs.captures == 4
        assert pipe.graphs.replays == sum(s.steps for s in PLAN_1 + PLAN_2)
        second = pipe.generate(*_plans(), PixelOptions("a red fox", seed=3, guidance_1=3.0))
        assert pipe.graphs.captures == 4 and pipe.graphs.replays == 2 * sum(s.steps for s in PLAN_1 + PLAN_2)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    rel = ((first.sample_2.cpu() - eager.sample_2.cpu()).norm() / eager.sample_2.norm()).item()
    assert rel < 1e-3, rel  # same noise stream; kernels (and Inductor's fusions) differ only in rounding
    assert ((second.sample_1 - first.sample_1).norm() / first.sample_1.norm()).item() > 1e-3
