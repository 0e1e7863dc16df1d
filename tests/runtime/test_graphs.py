"""The buffered, graph-ready denoise step equals the eager loop; on CUDA it is captured once per shape."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.plan import Stage, validate_plan
from megafusion.runtime.graphs import GraphKey
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline


def _relerr(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl"])
def test_buffered_step_equals_eager_loop_on_cpu(name, request):
    """Device-table indexing by a device step counter gives the eager loop's result (float32, CPU)."""
    bundle = request.getfixturevalue(name)
    plan = validate_plan(bundle.family, [Stage(128, 128, 4), Stage(192, 256, 3)])
    opts = GenerationOptions("a fox", guidance=5.0, seed=2)
    eager = MegaFusionPipeline(bundle).generate(plan, opts)
    fast_pipe = MegaFusionPipeline.fast(bundle, device="cpu")
    fast = fast_pipe.generate(plan, opts)
    assert _relerr(fast.latent, eager.latent) < 1e-5
    assert fast_pipe.graphs.captures == 0 and fast_pipe.graphs.replays == 0  # nothing captured on CPU


def test_no_cfg_batch_one(tiny_sd15):
    plan = validate_plan(tiny_sd15.family, [Stage(128, 128, 3), Stage(256, 256, 2)])
    opts = GenerationOptions("a fox", guidance=1.0, seed=2)
    eager = MegaFusionPipeline(tiny_sd15).generate(plan, opts)
    fast = MegaFusionPipeline.fast(tiny_sd15, device="cpu").generate(plan, opts)
    assert _relerr(fast.latent, eager.latent) < 1e-5


def test_one_shot_drops_each_stage_graph_state_after_the_stage(tiny_sd15):
    """A one-shot pipeline (mf-generate: one image a process) releases each stage's step state after the stage,
    so the graphs' pool serves the relay and decode; the image is the kept-state pipeline's."""
    from megafusion.core.loading import load_model

    plan = validate_plan(tiny_sd15.family, [Stage(128, 128, 3), Stage(256, 256, 2)])
    opts = GenerationOptions("a fox", seed=3)
    kept = MegaFusionPipeline.fast(tiny_sd15, device="cpu")
    ref = kept.generate(plan, opts)
    assert len(kept.graphs.buffers) == 2
    own = load_model("tiny-sd15")  # one-shot also sends the bundle's text encoders to the meta device
    pipe = MegaFusionPipeline.fast(own, device="cpu")
    pipe.one_shot = True
    released = []
    release = pipe.graphs.release
    pipe.graphs.release = lambda: (released.append(len(pipe.graphs.buffers)), release())
    got = pipe.generate(plan, opts)
    assert released == [1, 1] and pipe.graphs.buffers == {} and pipe.graphs.pool is None
    assert torch.equal(got.latent, ref.latent)
    assert all(p.is_meta for enc in own.text_encoders for p in enc.parameters())


def test_release_waits_for_the_replays_before_freeing_the_pool(monkeypatch):
    """On CUDA, release synchronizes the device while the graphs still hold their pool, then empties the cache: the
    replays run on the current stream, the pool's segments belong to the capture stream, and expandable segments
    unmap a freed segment after waiting for its own stream only (the H200 crash this guards against)."""
    from megafusion.runtime.graphs import GraphedDenoiser

    class Nets:
        capturable = True

    den = GraphedDenoiser(Nets(), torch.device("cuda"), capture=False)
    den.graphs[GraphKey(2, 8, 8, 1)] = object()
    den.pool = object()
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", len(den.graphs))))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache", len(den.graphs))))
    den.release()
    assert calls == [("synchronize", 1), ("empty_cache", 0)]
    assert den.pool is None and den.buffers == {}


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_graphs_captured_once_per_shape_and_replayed_every_step(name):
    from megafusion.core.loading import load_model

    bundle = load_model(name, device="cuda", dtype=torch.float32)
    plan = validate_plan(bundle.family, [Stage(128, 128, 5), Stage(192, 256, 3), Stage(256, 256, 2)])
    opts = GenerationOptions("a fox", seed=1)
    eager = MegaFusionPipeline(bundle).generate(plan, opts)
    pipe = MegaFusionPipeline.fast(bundle)
    first = pipe.generate(plan, opts)
    assert pipe.graphs.captures == 3 and pipe.graphs.replays == 10
    assert set(pipe.graphs.graphs) == {GraphKey(2, 16, 16, 1), GraphKey(2, 24, 32, 2), GraphKey(2, 32, 32, 2)}
    second = pipe.generate(plan, GenerationOptions("a fox", seed=1, guidance=3.0))
    assert pipe.graphs.captures == 3 and pipe.graphs.replays == 20  # new guidance, same graphs
    assert _relerr(first.latent, eager.latent) < 1e-4  # TF32/cuDNN choices may differ from eager slightly
    assert _relerr(second.latent, first.latent) > 1e-3


@pytest.mark.gpu
def test_one_shot_release_on_cuda_gives_the_kept_state_image():
    """On CUDA a one-shot run frees each stage's graphs and pool (device synchronized first) and still gives the
    image of a pipeline that keeps them: the same captures, replays and latent."""
    from megafusion.core.loading import load_model

    bundle = load_model("tiny-sdxl", device="cuda", dtype=torch.float32)
    plan = validate_plan(bundle.family, [Stage(128, 128, 5), Stage(256, 256, 3)])
    opts = GenerationOptions("a fox", seed=4)
    kept = MegaFusionPipeline.fast(bundle)
    ref = kept.generate(plan, opts)
    pipe = MegaFusionPipeline.fast(bundle)
    pipe.one_shot = True
    got = pipe.generate(plan, opts)
    assert pipe.graphs.captures == kept.graphs.captures == 2 and pipe.graphs.replays == 8
    assert pipe.graphs.graphs == {} and pipe.graphs.pool is None and len(kept.graphs.graphs) == 2
    assert _relerr(got.latent, ref.latent) < 1e-6  # same kernels, same order: equal but for cuDNN's choices


@pytest.mark.parametrize(("field", "value"), [("guidance", float("nan")), ("guidance", float("inf")),
                                              ("guidance", -1.0), ("seed", -1), ("seed", 2**64), ("seed", 1.5)])
def test_options_refuse_what_the_tools_refuse(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        GenerationOptions("a fox", **{field: value})
