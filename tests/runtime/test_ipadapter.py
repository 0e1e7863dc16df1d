"""IP-Adapter (runtime/ipadapter.py): one stage is diffusers' pipeline with the same IP-Adapter and image
embeddings (`ip_adapter_image_embeds`, DDIM); the embeddings reach every stage of a relay.

The IP-Adapter is made here in diffusers' state-dict layout (image_proj: proj + norm; ip_adapter: to_k_ip / to_v_ip
of every cross-attention, numbered 1, 3, 5, ...), random weights. Tolerance: 1e-5 relative (float32 CPU)."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.ipadapter import IPAdapterNetworks, cfg_image_embeds, load_ip_adapter
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

CLIP_DIM = 24
PROMPT = "a teapot"


def tiny_ip_adapter(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, CLIP_DIM, generator=g) * 0.2,
                  "proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip, key = {}, 1
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
        ip[f"{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.2
        ip[f"{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.2
        key += 2
    return {"image_proj": image_proj, "ip_adapter": ip}


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_one_stage_equals_diffusers_ip_adapter(model):
    from tests.runtime.test_reference_diffusers import _diffusers_pipe

    bundle = load_model(model)  # its own: the IP-Adapter changes the UNet in place
    plain_bundle = load_model(model)
    load_ip_adapter(bundle.unet, tiny_ip_adapter(bundle.unet), scale=0.6)
    embeds = torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(1))
    fam = bundle.family
    plan = validate_plan(fam, [Stage(fam.native_height, fam.native_width, 4)])
    opts = GenerationOptions(PROMPT, seed=2, reschedule=False, dilation=1)
    ours = MegaFusionPipeline(bundle, IPAdapterNetworks(TorchNetworks(bundle), embeds), "cpu").generate(plan, opts)

    pipe = _diffusers_pipe(bundle)
    ref = pipe(PROMPT, height=fam.native_height, width=fam.native_width, num_inference_steps=4, guidance_scale=7.0,
               ip_adapter_image_embeds=[cfg_image_embeds(embeds, True)], generator=torch.Generator().manual_seed(2),
               output_type="latent").images
    assert float((ours.latent - ref).norm() / ref.norm()) < 1e-5
    plain = MegaFusionPipeline(plain_bundle).generate(plan, opts)
    assert float((plain.latent - ref).norm() / ref.norm()) > 1e-4  # the adapter does act


def test_embeds_reach_every_stage_graphed_as_eager():
    bundle = load_model("tiny-sd15")
    load_ip_adapter(bundle.unet, tiny_ip_adapter(bundle.unet), scale=1.0)
    embeds = torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(3))
    plan = validate_plan(bundle.family, [Stage(128, 128, 2), Stage(192, 192, 1)])
    opts = GenerationOptions(PROMPT, seed=1)
    eager = MegaFusionPipeline(bundle, IPAdapterNetworks(TorchNetworks(bundle), embeds), "cpu").generate(plan, opts)
    fast = MegaFusionPipeline.fast(bundle, IPAdapterNetworks(TorchNetworks(bundle), embeds), "cpu")
    assert float((fast.generate(plan, opts).latent - eager.latent).norm() / eager.latent.norm()) < 1e-6
    other = MegaFusionPipeline(bundle, IPAdapterNetworks(TorchNetworks(bundle), -embeds), "cpu").generate(plan, opts)
    assert float((other.latent - eager.latent).norm() / eager.latent.norm()) > 1e-4
