"""The flow stage loop on CUDA (skipped without a GPU): fp32 on the GPU is the CPU's result; bf16 stays finite."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import default_plan
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_cuda_matches_cpu(name):
    plan = default_plan(load_model(name).family, 256, 192, total_steps=6)
    results = {}
    for dev, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
        b = load_model(name, device=dev, dtype=dtype)
        opts = FlowGenerationOptions("a red fox", guidance=b.family.default_guidance)
        results[dev, dtype] = FlowMegaFusionPipeline(b).generate(plan, opts)
    cpu, gpu = results["cpu", torch.float32].latent, results["cuda", torch.float32].latent.cpu()
    assert float((gpu - cpu).norm() / cpu.norm()) < 1e-3  # TF32 off by default for matmuls in fp32
    half = results["cuda", torch.bfloat16]
    assert torch.isfinite(half.latent).all() and half.peak_memory_bytes > 0
    assert float((half.latent.cpu() - cpu).norm() / cpu.norm()) < 0.1
