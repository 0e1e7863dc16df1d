"""The FLUX transformer's ONNX export (export/dit_flux_export.py): one file serves every token count and batch,
and ONNX Runtime gives the torch module's velocity (float32, CPU: 1e-4 relative), also through the flow loop."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import default_plan
from megafusion.engine.flow_networks import FlowTorchNetworks, image_ids
from megafusion.engine.flow_onnxruntime import OrtFluxTransformer
from megafusion.export.dit_flux_export import flux_transformer_spec, export_flux_transformer
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _relerr(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_spec_axes():
    fam = load_model("tiny-flux").family
    axes = flux_transformer_spec(fam).dynamic_axes()
    assert axes["hidden_states"] == {0: "batch", 1: "tokens"} and axes["rotary_cos"] == {0: "positions"}
    assert "guidance" not in flux_transformer_spec(fam, guidance_embeds=False).dynamic_axes()
    with pytest.raises(ValueError, match="tiny-sd3"):
        flux_transformer_spec(load_model("tiny-sd3").family)


@pytest.mark.slow
def test_ort_equals_torch_at_untraced_sizes_and_in_the_loop(tmp_path):
    bundle = load_model("tiny-flux")
    tr, fam = bundle.transformer, bundle.family
    path = tmp_path / "transformer.onnx"
    files = export_flux_transformer(bundle, path, external_threshold=1024)  # the external-data path, as at real size
    assert files == (path, path.with_name("transformer.onnx.data"))
    assert tr.pos_embed.__class__.__name__ == "FluxPosEmbed"  # the export put the model's own pos_embed back
    ort = OrtFluxTransformer(path, tr.pos_embed)
    g = torch.Generator().manual_seed(1)
    cfg = fam.transformer
    for b, h, w in ((1, 16, 16), (2, 20, 36), (1, 8, 12)):  # the last is the traced grid, at batch 1
        n, txt = (h // 2) * (w // 2), fam.t5_max_length
        args = dict(hidden_states=torch.randn(b, n, cfg["in_channels"], generator=g), timestep=torch.full((b,), 0.7),
                    guidance=torch.full((b,), 3.5), pooled_projections=torch.randn(b, cfg["pooled_projection_dim"]),
                    encoder_hidden_states=torch.randn(b, txt, cfg["joint_attention_dim"], generator=g),
                    txt_ids=torch.zeros(txt, 3), img_ids=image_ids(h, w, "cpu", torch.float32))
        with torch.no_grad():
            ref = tr(**args, return_dict=False)[0]
        assert _relerr(ort(**args)[0], ref) < 1e-4
    plan = default_plan(fam, 200, 150, total_steps=5)
    opts = FlowGenerationOptions("a red fox", guidance=3.5, seed=2)
    ours = FlowMegaFusionPipeline(bundle).generate(plan, opts).latent
    nets = FlowTorchNetworks(bundle)
    nets.transformer_fn = ort
    assert _relerr(FlowMegaFusionPipeline(bundle, nets).generate(plan, opts).latent, ours) < 1e-4
