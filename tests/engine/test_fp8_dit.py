"""FP8 projections for the transformer families (engine/fp8_dit.py): which layers the policy takes, and a
quantized transformer's velocity against the float one. `torch._scaled_mm` runs on the CPU in torch 2.13, so the
CPU tests run the real FP8 layers; tolerance: 5% relative L2, as #20's bound for the UNet's eps."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.engine.fp8 import Fp8Linear
from megafusion.engine.fp8_dit import DiTFp8Policy, dit_fp8_candidates, dit_layer_role, quantize_transformer


def test_roles_of_sd3_and_flux_layer_names():
    roles = {
        "transformer_blocks.3.attn.to_q": "attn_qkv", "transformer_blocks.3.attn2.to_v": "attn_qkv",
        "transformer_blocks.3.attn.to_out.0": "attn_out", "transformer_blocks.3.attn2.to_out.0": "attn_out",
        "transformer_blocks.3.attn.add_k_proj": "context_qkv", "transformer_blocks.3.attn.to_add_out": "context_out",
        "transformer_blocks.3.ff.net.0.proj": "ff_in", "transformer_blocks.3.ff.net.2": "ff_out",
        "transformer_blocks.3.ff_context.net.0.proj": "context_ff_in",
        "transformer_blocks.3.ff_context.net.2": "context_ff_out",
        "transformer_blocks.3.norm1.linear": "modulation", "transformer_blocks.3.norm1_context.linear": "modulation",
        "single_transformer_blocks.7.attn.to_k": "attn_qkv", "single_transformer_blocks.7.proj_mlp": "single_mlp_in",
        "single_transformer_blocks.7.proj_out": "single_out", "single_transformer_blocks.7.norm.linear": "modulation",
        "proj_out": "other", "context_embedder": "other", "x_embedder": "other", "norm_out.linear": "other",
        "time_text_embed.timestep_embedder.linear_1": "other",
    }
    assert {name: dit_layer_role(name) for name in roles} == roles


def _inputs(bundle):
    cfg = bundle.transformer.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, bundle.family.latent_channels, 16, 16, generator=g)
    return (z, torch.full((2,), 600.0), torch.randn(2, 20, cfg.joint_attention_dim, generator=g),
            torch.randn(2, cfg.pooled_projection_dim, generator=g), 3.5)


@pytest.mark.parametrize("name,roles", [
    ("tiny-sd3", {"attn_qkv", "attn_out", "ff_in", "ff_out"}),
    ("tiny-flux", {"attn_qkv", "attn_out", "ff_in", "ff_out", "single_mlp_in", "single_out"}),
])
def test_quantized_transformer_velocity_within_five_percent(name, roles):
    ref, fp8 = load_model(name), load_model(name)  # same seed: same weights
    names = quantize_transformer(fp8.transformer)
    assert {dit_layer_role(n) for n in names} == roles
    assert all(isinstance(fp8.transformer.get_submodule(n), Fp8Linear) for n in names)
    assert not any(isinstance(m, Fp8Linear) for n, m in fp8.transformer.named_modules()
                   if dit_layer_role(n) in ("context_qkv", "context_out", "modulation", "other"))
    x = _inputs(ref)
    want = FlowTorchNetworks(ref).velocity(*x)
    got = FlowTorchNetworks(fp8).velocity(*x)
    rel = float((got - want).norm() / want.norm())
    assert 1e-5 < rel < 0.05, rel  # quantized (not exact), within the bound


def test_flux_ip_adapter_on_an_fp8_transformer(tmp_path):
    """mf-generate loads a FLUX IP-Adapter after quantizing (its loader casts the model): a two-stage relay stays
    within 5% of the float transformer's with the same adapter, and the image embeddings still act."""
    from megafusion.core.plan import Stage, validate_plan
    from megafusion.runtime.flow_ipadapter import FlowIPAdapterNetworks, load_flux_ip_adapter, read_flux_ip_adapter
    from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline
    from tests.runtime.test_flow_ipadapter import CLIP_DIM, save_tiny_flux_ip_adapter

    ref, fp8 = load_model("tiny-flux"), load_model("tiny-flux")
    ip = save_tiny_flux_ip_adapter(ref.family.transformer, tmp_path / "ip.safetensors")
    quantize_transformer(fp8.transformer)
    for b in (ref, fp8):
        load_flux_ip_adapter(b.transformer, read_flux_ip_adapter(ip, b.transformer), 0.8)
    embeds = torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(1))
    plan = validate_plan(ref.family, [Stage(128, 128, 2), Stage(160, 160, 1)])
    opts = FlowGenerationOptions("a teapot", guidance=3.5, seed=1)

    def run(b, e):
        return FlowMegaFusionPipeline(b, FlowIPAdapterNetworks(FlowTorchNetworks(b), e)).generate(plan, opts).latent

    want, got = run(ref, embeds), run(fp8, embeds)
    rel = float((got - want).norm() / want.norm())
    assert 1e-5 < rel < 0.05, rel
    assert float((run(fp8, -embeds) - got).norm() / got.norm()) > 0.1


def test_policy_roles_checked_and_chosen():
    with pytest.raises(ValueError, match="unknown FP8 layer role.*'?qkv_all"):
        DiTFp8Policy(roles=("qkv_all",))
    b = load_model("tiny-flux")
    only = dit_fp8_candidates(b.transformer, DiTFp8Policy(roles=("single_mlp_in",)))
    assert only and all(n.endswith("proj_mlp") for n in only)


@pytest.mark.gpu
def test_fp8_transformer_on_cuda_compiles_and_stays_close():
    ref = load_model("tiny-sd3", device="cuda", dtype=torch.bfloat16)
    fp8 = load_model("tiny-sd3", device="cuda", dtype=torch.bfloat16)
    half = load_model("tiny-sd3", device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="bfloat16"):
        quantize_transformer(half.transformer)
    quantize_transformer(fp8.transformer)
    x = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in _inputs(ref))
    want = FlowTorchNetworks(ref).velocity(*x)
    got = FlowTorchNetworks(fp8, compiled=True).velocity(*x)
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.05, rel
