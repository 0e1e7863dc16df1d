"""Helpers for tests that build engines (tiny models, ONNX Runtime, fp32, a 128 -> 256 two-stage plan)."""
from __future__ import annotations

STAGES = "128x128:2,256x256:2"
"""The small plan every engine test builds for: latent 16 then 32, two steps each."""


def build(bundle, out, backend="onnxruntime", stages=STAGES, **kw):
    from megafusion.engine.build import BuildRequest, build_engines
    from megafusion.core.plan import parse_stages, validate_plan

    plan = validate_plan(bundle.family, parse_stages(stages))
    return build_engines(bundle, BuildRequest(plan, backend, kw.pop("precision", "fp32"), out, **kw))


LATENT_ATOL = 1e-3
"""Engines vs the torch modules, final latents (fp32 CPU; measured about 3e-5 on latents of size 6 to 16)."""


def assert_generation_matches_torch(bundle, nets, plan, opts, label=""):
    """A whole generation through `nets` equals the torch backend's: latents within LATENT_ATOL, image
    within one level, and the reference is a real image rather than an all-zero comparison."""
    import numpy as np

    from megafusion.engine.networks import TorchNetworks
    from megafusion.runtime.pipeline import MegaFusionPipeline

    got = MegaFusionPipeline(bundle, nets, "cpu").generate(plan, opts)
    ref = MegaFusionPipeline(bundle, TorchNetworks(bundle), "cpu").generate(plan, opts)
    diff = (got.latent - ref.latent).abs().max().item()
    assert got.latent.shape == ref.latent.shape == (1, 4, 32, 32)
    assert diff <= LATENT_ATOL, f"{label}latents differ by {diff}"
    assert np.abs(got.image.astype(int) - ref.image.astype(int)).max() <= 1
    assert ref.latent.abs().max() > 0.1
