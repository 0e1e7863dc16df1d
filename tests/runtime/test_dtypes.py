"""The runtime runs in fp32, fp16 and bf16; lower precisions stay close to fp32 (same seed, same latent draw
rounded to the dtype). Tolerances are loose: bf16 keeps 8 bits of mantissa through 20 UNet calls."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 0.05), (torch.bfloat16, 0.15)])
def test_low_precision_close_to_fp32(dtype, tol):
    ref_b = load_model("tiny-sd15")
    low_b = load_model("tiny-sd15", dtype=dtype)
    assert low_b.unet.dtype == dtype
    plan = validate_plan(ref_b.family, [Stage(128, 128, 4), Stage(192, 192, 2)])
    opts = GenerationOptions("a fox", seed=0)
    ref = MegaFusionPipeline(ref_b).generate(plan, opts).latent
    low = MegaFusionPipeline(low_b).generate(plan, opts).latent
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    err = float((low - ref).norm() / ref.norm())
    assert 0 < err < tol
