"""The compiled transformer of SD3 / FLUX kept across processes (engine/flow_networks.py `keep_compiled`, the
machinery of engine/precompiled.py): the first networks trace and save each call signature, fresh networks on the
same folder load them and trace nothing, with the same latents; the key tells apart what traces other code under
the same configs. Compiled with `aot_eager` where this torch precompiles with it (seconds), as
tests/engine/test_precompiled.py; the Inductor round trip across two processes is tests/engine/test_compile_cache.py's
(UNet) and the H200's (`mf-generate --model sd3 --mode compiled`)."""
from __future__ import annotations

import pytest
import torch

import megafusion.engine.flow_networks as flow_networks
from megafusion.core.loading import load_model
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine.compile_cache import compile_key
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.engine.precompiled import precompile_missing
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

from tests.engine.test_precompiled import _backend

STAGES = "128x128:2,160x160:1"


def _fast_compile(fn, options, guard_filter=None):
    opts = {"guard_filter_fn": guard_filter} if guard_filter is not None else {}
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=_backend(), options=opts)


def _latent(bundle, nets, plan):
    opts = FlowGenerationOptions("a red fox", guidance=bundle.family.default_guidance, seed=3)
    return FlowMegaFusionPipeline(bundle, nets, "cpu", "eager").generate(plan, opts).latent


@pytest.mark.skipif(bool(precompile_missing()), reason=precompile_missing() or "")
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_fresh_networks_load_the_transformer_instead_of_tracing(name, tmp_path, monkeypatch):
    monkeypatch.setattr(flow_networks, "compile_with", _fast_compile)
    bundle = load_model(name)
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    eager = _latent(bundle, FlowTorchNetworks(bundle), plan)
    first = FlowTorchNetworks(bundle, compiled=True)
    first.keep_compiled(tmp_path)
    got = _latent(bundle, first, plan)
    # one signature per stage shape (SD3: its CFG batch of 2 in both)
    assert first.precompile_counters() == {"traced": 2, "loaded": 0, "saved": 2, "rejected": 0}
    assert len(list(tmp_path.glob("transformer-*.bin"))) == 2
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-6)
    second = FlowTorchNetworks(bundle, compiled=True)
    second.keep_compiled(tmp_path)
    again = _latent(bundle, second, plan)
    assert second.precompile_counters() == {"traced": 0, "loaded": 2, "saved": 0, "rejected": 0}
    assert torch.equal(again, got)


def test_the_key_names_what_traces_other_code():
    bundle = load_model("tiny-flux")
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    key = compile_key(FlowTorchNetworks(bundle, compiled=True), "cpu", plan, cfg=False)
    assert key == compile_key(FlowTorchNetworks(bundle, compiled=True), "cpu", plan, cfg=False)  # weights apart
    assert key.model == "tiny-flux" and "batch 1" in key.shapes and "FluxAttnProcessor" in key.options
    other_plan = validate_plan(bundle.family, parse_stages("128x128:2,192x192:1"))
    assert compile_key(FlowTorchNetworks(bundle, compiled=True), "cpu", other_plan, cfg=False) != key
    # a layer of another class under the same config (as FP8 projections or an IP-Adapter's processors are)
    block = bundle.transformer.transformer_blocks[0]
    block.norm1.linear = torch.nn.Sequential(block.norm1.linear)
    changed = compile_key(FlowTorchNetworks(bundle, compiled=True), "cpu", plan, cfg=False)
    assert changed != key and changed.architecture == key.architecture and "Sequential" in changed.options


def test_only_compiled_networks_keep_functions(tmp_path):
    with pytest.raises(ValueError, match="not compiled"):
        FlowTorchNetworks(load_model("tiny-sd3")).keep_compiled(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_cuda_compiled_mode_loads_the_kept_transformer(name, tmp_path):
    """--mode compiled on CUDA with Inductor, as mf-generate runs it: the second networks load the functions the
    first traced, inside the stages' CUDA graphs, and give the same latents; both within Inductor's reordering of
    fp32 reductions (1e-3) of the eager loop."""
    bundle = load_model(name, device="cuda", dtype=torch.float32)
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    opts = FlowGenerationOptions("a red fox", guidance=bundle.family.default_guidance, seed=3)
    eager = FlowMegaFusionPipeline(bundle, FlowTorchNetworks(bundle), "cuda", "eager").generate(plan, opts).latent
    latents, counters = [], []
    for _ in range(2):
        nets = FlowTorchNetworks(bundle, compiled=True)
        nets.keep_compiled(tmp_path)
        pipe = FlowMegaFusionPipeline(bundle, nets, "cuda", "compiled")
        latents.append(pipe.generate(plan, opts).latent)
        counters.append(nets.precompile_counters())
        assert pipe.graphs.captures == 2
    assert counters == [{"traced": 2, "loaded": 0, "saved": 2, "rejected": 0},
                        {"traced": 0, "loaded": 2, "saved": 0, "rejected": 0}]
    assert torch.equal(latents[1], latents[0])
    assert ((latents[0] - eager).norm() / eager.norm()).item() < 1e-3
