"""ONNX Runtime backend: a full MegaFusion generation from built engines matches the torch backend.

Tolerance: final latents within 1e-3 absolute (fp32 end to end; measured about 1e-5), the uint8 images
within 1 level. Both runs draw the same noise from the same seed, so any larger gap is a real difference.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.engine.load import open_engines
from megafusion.engine.networks import TorchNetworks
from megafusion.engine.onnxruntime_backend import OrtRunner
from megafusion.engine.runners import EngineNetworks, infer_axes
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.core.specs import unet_spec
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

from tests.engines import LATENT_ATOL, STAGES, assert_generation_matches_torch



@pytest.mark.parametrize("family", ["tiny-sdxl", "tiny-sd15"])
@pytest.mark.parametrize("relay", ["pixel", "latent"])
def test_generation_matches_torch(request, family, relay):
    key = family.replace("-", "_")
    bundle = request.getfixturevalue(key)
    engines = request.getfixturevalue(key.replace("tiny_", "") + "_engines")
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    opts = GenerationOptions("a red cube", negative_prompt="blurry", seed=3, relay=relay)
    nets, desc = open_engines(engines, bundle, plan, relay=relay)
    assert isinstance(nets, EngineNetworks) and desc.startswith("onnxruntime")
    assert_generation_matches_torch(bundle, nets, plan, opts, f"{family}: ")


def test_sdxl_empty_negative_prompt_and_no_guidance(tiny_sdxl, sdxl_engines):
    plan = validate_plan(tiny_sdxl.family, parse_stages(STAGES))
    nets, _ = open_engines(sdxl_engines, tiny_sdxl, plan)
    for opts in (GenerationOptions("x", seed=1), GenerationOptions("x", guidance=1.0, seed=1)):  # batch 2 and 1
        got = MegaFusionPipeline(tiny_sdxl, nets).generate(plan, opts).latent
        ref = MegaFusionPipeline(tiny_sdxl, TorchNetworks(tiny_sdxl)).generate(plan, opts).latent
        assert (got - ref).abs().max().item() <= LATENT_ATOL


def test_runner_allocates_outputs_from_the_spec(tiny_sdxl, sdxl_engines):
    from megafusion.engine.cache import EngineCache

    entry = next(e for e in EngineCache(sdxl_engines).entries().values() if e.key.variant == "dilated")
    spec = unet_spec(tiny_sdxl.family, "fp32", 2)
    runner = OrtRunner(sdxl_engines / entry.files[0].path, spec, tiny_sdxl.family.vae_scale)
    inputs = dict(zip([t.name for t in spec.inputs], spec.sample_inputs(spec.axes(1, 32, 16, 8))))
    assert infer_axes(spec, inputs, 8) == {"batch": 1, "height": 32, "width": 16, "image_height": 256,
                                            "image_width": 128}
    out = runner.run(inputs)
    assert list(out) == ["eps"] and out["eps"].shape == (1, 4, 32, 16) and out["eps"].dtype == torch.float32


def test_cuda_graphs_are_captured_on_cuda_only(tiny_sdxl, sdxl_engines):
    from megafusion.engine.cache import EngineCache

    entry = next(e for e in EngineCache(sdxl_engines).entries().values() if e.key.variant == "dilated")
    spec = unet_spec(tiny_sdxl.family, "fp32", 2)
    runner = OrtRunner(sdxl_engines / entry.files[0].path, spec, tiny_sdxl.family.vae_scale, cuda_graph=True)
    runner.run(dict(zip([t.name for t in spec.inputs], spec.sample_inputs(spec.axes(1, 32, 16, 8)))))
    assert not runner.cuda_graph and runner.graphs_captured == 0


def test_runner_refuses_a_model_of_another_spec(tiny_sdxl, sdxl_engines):
    from megafusion.engine.cache import EngineCache

    entry = next(e for e in EngineCache(sdxl_engines).entries().values() if e.key.network == "vae_decoder")
    with pytest.raises(RuntimeError, match="differ from the spec"):
        OrtRunner(sdxl_engines / entry.files[0].path, unet_spec(tiny_sdxl.family), 8)


def test_unbuilt_dilation_is_an_error(tiny_sdxl, sdxl_engines):
    plan = validate_plan(tiny_sdxl.family, parse_stages(STAGES))
    nets, _ = open_engines(sdxl_engines, tiny_sdxl, plan)
    with pytest.raises(KeyError, match="dilation 3"):
        nets.unet(torch.zeros(1, 4, 32, 32), torch.tensor(1), torch.zeros(1, 77, 64), torch.zeros(1, 32),
                  torch.zeros(1, 6), dilation=3)


def test_cuda_provider_options():
    import torch

    from megafusion.engine.onnxruntime_backend import cuda_provider_options

    o = cuda_provider_options(torch.device("cuda", 1), 1234, cuda_graph=True, shrink_arena=True,
                              conv_algo_search="HEURISTIC")
    assert o == {"device_id": "1", "has_user_compute_stream": "1", "user_compute_stream": "1234",
                 "enable_cuda_graph": "1", "cudnn_conv_algo_search": "HEURISTIC",
                 "arena_extend_strategy": "kSameAsRequested"}
    assert "arena_extend_strategy" not in cuda_provider_options(torch.device("cuda"), 0, False, False)
    with pytest.raises(ValueError, match="'FASTEST'"):
        cuda_provider_options(torch.device("cuda"), 0, False, False, "FASTEST")
