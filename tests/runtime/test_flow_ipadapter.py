"""FLUX IP-Adapter through the relay (runtime/flow_ipadapter.py, docs/ALGORITHM.md §18).

Reference: diffusers' FluxPipeline loaded back from the saved tiny-flux folder, the same IP-Adapter file loaded
with its own `load_ip_adapter` (its own key conversion) and scale, given the same `ip_adapter_image_embeds`. The
adapter is made here in XLabs' file layout (ip_adapter_proj_model.*, double_blocks.{i}.processor.*), random
weights. Tolerance: 1e-5 relative on the final latent (float32 CPU), as test_flow_reference.py.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks, pack
from megafusion.runtime.flow_ipadapter import FlowIPAdapterNetworks, load_flux_ip_adapter, read_flux_ip_adapter
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline
from megafusion.runtime.ipadapter import IPAdapterError

CLIP_DIM = 24  # tests/runtime/test_ipadapter.py's tiny image encoder's projection
PROMPT = "a teapot"


def _relerr(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def save_tiny_flux_ip_adapter(transformer_config, path, seed=0, width=None):
    """An IP-Adapter for the transformer's double blocks in XLabs' layout (4 image tokens of its text width)."""
    from safetensors.torch import save_file

    cfg = transformer_config
    text = cfg["joint_attention_dim"]
    width = width or cfg["num_attention_heads"] * cfg["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    flat = {"ip_adapter_proj_model.proj.weight": torch.randn(4 * text, CLIP_DIM, generator=g) * 0.2,
            "ip_adapter_proj_model.proj.bias": torch.randn(4 * text, generator=g) * 0.1,
            "ip_adapter_proj_model.norm.weight": torch.ones(text), "ip_adapter_proj_model.norm.bias": torch.zeros(text)}
    for i in range(cfg["num_layers"]):
        for kv in ("k", "v"):
            key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            flat[f"{key}.weight"] = torch.randn(width, text, generator=g) * 0.3
            flat[f"{key}.bias"] = torch.randn(width, generator=g) * 0.1
    save_file(flat, str(path))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tests.runtime.test_flow_reference import save_tiny

    root = tmp_path_factory.mktemp("tiny-flux-ip")
    save_tiny("tiny-flux", root / "model")
    return root / "model", save_tiny_flux_ip_adapter(load_model("tiny-flux").family.transformer, root / "ip.safetensors")


def _adapted(root, ip, scale):
    bundle = load_model("tiny-flux", str(root))  # its own: the adapter changes the transformer in place
    load_flux_ip_adapter(bundle.transformer, read_flux_ip_adapter(ip, bundle.transformer), scale)
    return bundle


def test_one_stage_equals_diffusers_flux_ip_adapter(saved):
    from diffusers import FluxPipeline

    root, ip = saved
    bundle = _adapted(root, ip, 0.6)
    embeds = torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(1))
    plan = validate_plan(bundle.family, [Stage(128, 128, 4)])
    opts = FlowGenerationOptions(PROMPT, guidance=3.5, seed=3)
    ours = FlowMegaFusionPipeline(bundle, FlowIPAdapterNetworks(FlowTorchNetworks(bundle), embeds)).generate(
        plan, opts).latent

    pipe = FluxPipeline.from_pretrained(str(root))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(ip.parent), weight_name=ip.name, image_encoder_pretrained_model_name_or_path=None)
    pipe.set_ip_adapter_scale(0.6)
    ref = pipe(PROMPT, height=128, width=128, num_inference_steps=4, guidance_scale=3.5,
               ip_adapter_image_embeds=[embeds],
               negative_ip_adapter_image_embeds=[torch.zeros_like(embeds)],  # unused (no true CFG); saves an encoder
               generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    assert _relerr(pack(ours), ref) < 1e-5
    plain = FlowMegaFusionPipeline(load_model("tiny-flux", str(root))).generate(plan, opts).latent
    assert _relerr(pack(plain), ref) > 1e-3  # the adapter does act


@pytest.mark.slow
def test_embeds_reach_every_stage_graphed_as_eager_with_a_controlnet(saved):
    """Two stages, IP-Adapter and a ControlNet together: the graphs mode's buffered step is the eager one, bit for
    bit, and other embeddings give another latent."""
    from megafusion.runtime.controlnet import Control
    from megafusion.runtime.flow_controlnet import ControlledFlowNetworks
    from tests.runtime.test_flow_controlnet import control_image, tiny_flow_controlnet

    root, ip = saved
    bundle = _adapted(root, ip, 1.0)
    embeds = torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(2))
    plan = validate_plan(bundle.family, [Stage(128, 128, 2), Stage(160, 160, 1)])
    opts = FlowGenerationOptions(PROMPT, guidance=3.5, seed=1, relay="latent")
    control = Control(tiny_flow_controlnet(bundle.family, 1).eval(), control_image(128, 128), 0.8)

    def nets(e):
        return ControlledFlowNetworks(FlowIPAdapterNetworks(FlowTorchNetworks(bundle), e), [control], "cpu")

    eager = FlowMegaFusionPipeline(bundle, nets(embeds)).generate(plan, opts).latent
    graphed = FlowMegaFusionPipeline(bundle, nets(embeds), mode="graphs").generate(plan, opts).latent
    assert torch.equal(graphed, eager)
    other = FlowMegaFusionPipeline(bundle, nets(-embeds)).generate(plan, opts).latent
    assert _relerr(other, eager) > 1e-4


def test_adapter_for_another_architecture_is_refused_by_name(tmp_path):
    bundle = load_model("tiny-flux")
    cfg = bundle.family.transformer
    wide = save_tiny_flux_ip_adapter(cfg, tmp_path / "wide.safetensors", width=48)
    with pytest.raises(IPAdapterError, match=r"wide.safetensors'.*double block 0's to_k_ip is \(48, 32\), the "
                                             r"transformer needs \(32, 32\)"):
        read_flux_ip_adapter(wide, bundle.transformer)
    from safetensors.torch import save_file

    save_file({"unet.proj.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(IPAdapterError, match="unknown key 'unet.proj.weight'"):
        read_flux_ip_adapter(tmp_path / "other.safetensors", bundle.transformer)
    assert read_flux_ip_adapter(save_tiny_flux_ip_adapter(cfg, tmp_path / "ok.safetensors"), bundle.transformer)


@pytest.mark.gpu
def test_cuda_graph_holds_ip_adapter_and_controlnet_and_matches_eager(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from megafusion.runtime.controlnet import Control
    from megafusion.runtime.flow_controlnet import ControlledFlowNetworks
    from tests.runtime.test_flow_controlnet import control_image, tiny_flow_controlnet

    b = load_model("tiny-flux", device="cuda", dtype=torch.float32)
    ip = save_tiny_flux_ip_adapter(b.family.transformer, tmp_path / "ip.safetensors")
    load_flux_ip_adapter(b.transformer, read_flux_ip_adapter(ip, b.transformer), 0.8)
    embeds = torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(2))
    control = Control(tiny_flow_controlnet(b.family, 1).to("cuda").eval(), control_image(128, 128).cuda(), 0.8)
    plan = validate_plan(b.family, [Stage(128, 128, 3), Stage(192, 160, 2)])
    opts = FlowGenerationOptions(PROMPT, guidance=3.5, seed=1)

    def nets():
        return ControlledFlowNetworks(FlowIPAdapterNetworks(FlowTorchNetworks(b), embeds), [control], "cuda")

    eager = FlowMegaFusionPipeline(b, nets()).generate(plan, opts).latent
    pipe = FlowMegaFusionPipeline(b, nets(), mode="graphs")
    graphed = pipe.generate(plan, opts).latent
    assert pipe.graphs.captures == 2 and pipe.graphs.replays == plan.total_steps
    assert _relerr(graphed, eager) < 1e-4  # same kernels; cuBLAS may pick another algorithm in a capture
