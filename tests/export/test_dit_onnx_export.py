"""The SD3 transformer's ONNX export: one file serves every stage size (dynamic batch, height, width), and the
flow stage loop on ONNX Runtime gives the torch loop's latent (float32, CPU: 1e-4 relative)."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.dit_specs import transformer_spec
from megafusion.core.loading import load_model
from megafusion.core.plan import default_plan
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.engine.flow_onnxruntime import OrtSD3Transformer
from megafusion.export.dit_onnx_export import export_sd3_transformer
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

pytest.importorskip("onnxruntime")


def _relerr(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_spec_axes():
    spec = transformer_spec(load_model("tiny-sd3").family)
    assert spec.dynamic_axes()["hidden_states"] == {0: "batch", 2: "height", 3: "width"}
    with pytest.raises(ValueError, match="only the SD3 transformer"):
        transformer_spec(load_model("tiny-flux").family)


@pytest.mark.slow
def test_ort_plan_equals_torch(tmp_path):
    bundle = load_model("tiny-sd3")
    path = tmp_path / "transformer.onnx"
    files = export_sd3_transformer(bundle, path, external_threshold=1024)  # the external-data path, as at real size
    assert files == (path, path.with_name("transformer.onnx.data"))
    ort = OrtSD3Transformer(path)
    # Sizes the export was not traced at, batch 1 and 2.
    g = torch.Generator().manual_seed(1)
    for b, h, w in ((2, 16, 16), (1, 20, 36)):
        x = torch.randn(b, 16, h, w, generator=g)
        args = dict(hidden_states=x, timestep=torch.full((b,), 700.0), encoder_hidden_states=torch.randn(b, 333, 64),
                    pooled_projections=torch.randn(b, 64))
        with torch.no_grad():
            ref = bundle.transformer(**args, return_dict=False)[0]
        assert _relerr(ort(**args)[0], ref) < 1e-4
    plan = default_plan(bundle.family, 200, 150, total_steps=5)
    opts = FlowGenerationOptions("a red fox", seed=2)
    ours = FlowMegaFusionPipeline(bundle).generate(plan, opts).latent
    nets = FlowTorchNetworks(bundle)
    nets.transformer_fn = ort
    assert _relerr(FlowMegaFusionPipeline(bundle, nets).generate(plan, opts).latent, ours) < 1e-4
