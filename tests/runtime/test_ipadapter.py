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


def save_tiny_image_encoder(folder):
    """A tiny CLIP vision model with projection and its image processor, saved as a diffusers pipeline keeps them."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=CLIP_DIM, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8)
    CLIPVisionModelWithProjection(cfg).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def save_ip_adapter(state, path):
    from safetensors.torch import save_file

    save_file({f"{part}.{k}": v.contiguous() for part, d in state.items() for k, v in d.items()}, str(path))
    return path


def test_image_path_equals_diffusers_ip_adapter_image(tmp_path):
    """From a file and an image: read, checked, loaded, the image encoded as diffusers' encode_image encodes it."""
    import numpy as np
    from PIL import Image

    from megafusion.runtime.ipadapter import encode_ip_image, load_image_encoder, read_ip_adapter
    from tests.runtime.test_reference_diffusers import _diffusers_pipe

    bundle = load_model("tiny-sd15")
    path = save_ip_adapter(tiny_ip_adapter(bundle.unet, seed=4), tmp_path / "ip.safetensors")
    encoder, processor = load_image_encoder(save_tiny_image_encoder(tmp_path / "enc"), "cpu", torch.float32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    load_ip_adapter(bundle.unet, read_ip_adapter(path, bundle.unet), scale=0.8)
    embeds = encode_ip_image(encoder, processor, image, "cpu")
    plan = validate_plan(bundle.family, [Stage(128, 128, 3)])
    opts = GenerationOptions(PROMPT, seed=5, reschedule=False, dilation=1)
    ours = MegaFusionPipeline(bundle, IPAdapterNetworks(TorchNetworks(bundle), embeds), "cpu").generate(plan, opts)

    pipe = _diffusers_pipe(bundle)
    pipe.image_encoder, pipe.feature_extractor = encoder, processor
    ref = pipe(PROMPT, height=128, width=128, num_inference_steps=3, guidance_scale=7.0, ip_adapter_image=image,
               generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert float((ours.latent - ref).norm() / ref.norm()) < 1e-5


def test_foreign_ip_adapter_refused(tmp_path):
    from megafusion.runtime.ipadapter import IPAdapterError, read_ip_adapter

    sd15, sdxl = load_model("tiny-sd15"), load_model("tiny-sdxl")
    path = save_ip_adapter(tiny_ip_adapter(sdxl.unet), tmp_path / "xl.safetensors")
    with pytest.raises(IPAdapterError, match="another architecture|does not give 4 tokens"):
        read_ip_adapter(path, sd15.unet)
    with pytest.raises(IPAdapterError, match="no such file"):
        read_ip_adapter(tmp_path / "none.safetensors", sd15.unet)
    from safetensors.torch import save_file

    save_file({"vae.x": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(IPAdapterError, match="unknown key 'vae.x'"):
        read_ip_adapter(tmp_path / "odd.safetensors", sd15.unet)


def test_ip_adapter_with_controlnet_equals_diffusers():
    """Both at once: the ControlNet's residuals and the IP-Adapter's embeddings in one UNet call, as diffusers'
    ControlNet pipeline given ip_adapter_image_embeds computes it."""
    import tempfile

    from megafusion.runtime.controlnet import Control, ControlledNetworks, load_controlnet
    from tests.runtime.test_controlnet import _diffusers_controlnet_pipe, control_image, save_tiny_controlnet

    bundle = load_model("tiny-sd15")
    with tempfile.TemporaryDirectory() as tmp:
        cnet = load_controlnet(save_tiny_controlnet(bundle.unet, f"{tmp}/cn"), bundle.unet, "cpu", torch.float32)
    load_ip_adapter(bundle.unet, tiny_ip_adapter(bundle.unet, seed=2), scale=0.7)
    embeds = torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(4))
    image = control_image(128, 128, 3)
    plan = validate_plan(bundle.family, [Stage(128, 128, 3)])
    opts = GenerationOptions(PROMPT, seed=8, reschedule=False, dilation=1)
    nets = ControlledNetworks(IPAdapterNetworks(TorchNetworks(bundle), embeds), [Control(cnet, image, 0.9)], "cpu")
    ours = MegaFusionPipeline(bundle, nets, "cpu").generate(plan, opts)
    ref = _diffusers_controlnet_pipe(bundle, cnet)(
        PROMPT, image=image, height=128, width=128, num_inference_steps=3, guidance_scale=7.0,
        controlnet_conditioning_scale=0.9, ip_adapter_image_embeds=[cfg_image_embeds(embeds, True)],
        generator=torch.Generator().manual_seed(8), output_type="latent").images
    assert float((ours.latent - ref).norm() / ref.norm()) < 1e-5
