"""SD3 IP-Adapter through the relay (runtime/flow_ipadapter_sd3.py, docs/ALGORITHM.md §18).

Reference: diffusers' StableDiffusion3Pipeline loaded back from the saved tiny-sd3 folder, the same IP-Adapter file
and SigLIP encoder folder loaded with its own `load_ip_adapter`, the same scale and reference image (so the
encoder, its processor, the zero negative half and the per-step projection are all compared). The adapter is
random weights in diffusers' file layout (image_proj.*, ip_adapter.{i}.*), a tiny SigLIP beside it.
Tolerance: 1e-5 relative on the final latent (float32 CPU), as test_flow_reference.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.runtime.flow_ipadapter_sd3 import (SD3IPAdapterNetworks, check_sd3_ip_adapter_file,
                                                    encode_sd3_ip_image, load_sd3_ip_adapter, load_siglip_encoder,
                                                    read_sd3_ip_adapter)
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline
from megafusion.runtime.ipadapter import IPAdapterError

SIGLIP_DIM = 32  # the tiny SigLIP's hidden size: the projection's embed_dim
PROMPT = "a teapot"


def _relerr(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def save_tiny_siglip(folder, seed=0):
    """A tiny SigLIP vision model (random weights) and its processor at 32x32 pixels: 16 tokens of 32 features."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=SIGLIP_DIM, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=2, image_size=32, patch_size=8)
    SiglipVisionModel(cfg).eval().save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_sd3_ip_adapter(transformer_config, path, seed=0, width=None, layers=None):
    """An SD3 IP-Adapter for the transformer in diffusers' file layout, random weights: diffusers' own modules
    (IPAdapterTimeImageProjection: 4 image tokens, hidden 64 = one head of 64; one
    SD3IPAdapterJointAttnProcessor2_0 per attention layer), every tensor redrawn so none is left at its init."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection
    from safetensors.torch import save_file

    cfg = transformer_config
    width = width or cfg["num_attention_heads"] * cfg["attention_head_dim"]
    hidden = 64  # diffusers reads the heads as to_q rows // 64
    proj = IPAdapterTimeImageProjection(embed_dim=SIGLIP_DIM, output_dim=width, hidden_dim=hidden, heads=1,
                                        num_queries=4, timestep_in_dim=32)
    flat = {f"image_proj.{k}": v for k, v in proj.state_dict().items()}
    for i in range(cfg["num_layers"] if layers is None else layers):
        proc = SD3IPAdapterJointAttnProcessor2_0(hidden_size=width, ip_hidden_states_dim=width,
                                                 head_dim=cfg["attention_head_dim"], timesteps_emb_dim=hidden)
        flat.update({f"ip_adapter.{i}.{k}": v for k, v in proc.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    for k, v in flat.items():
        base = 1.0 if k.endswith(("norm.weight", "ln0.weight", "ln1.weight", "norm_q.weight", "norm_k.weight",
                                  "norm_ip_k.weight", "norm_out.weight")) else 0.0
        flat[k] = (base + torch.randn(v.shape, generator=g) * 0.2).contiguous()
    save_file(flat, str(path))
    return path


def reference_image(size=48) -> Image.Image:
    return Image.fromarray((np.indices((size, size)).sum(0) % 16 * 16).astype(np.uint8)).convert("RGB")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model folder, adapter folder holding ip-adapter.safetensors and image_encoder/)."""
    from tests.runtime.test_flow_reference import save_tiny

    root = tmp_path_factory.mktemp("tiny-sd3-ip")
    save_tiny("tiny-sd3", root / "model")
    (root / "ip").mkdir()
    save_tiny_sd3_ip_adapter(load_model("tiny-sd3").family.transformer, root / "ip" / "ip-adapter.safetensors")
    save_tiny_siglip(root / "ip" / "image_encoder")
    return root / "model", root / "ip"


def _adapted(root, ip, scale):
    """The saved model with the adapter in (its own bundle: the adapter changes the transformer in place) and the
    reference image's SigLIP features."""
    bundle = load_model("tiny-sd3", str(root))
    load_sd3_ip_adapter(bundle.transformer, read_sd3_ip_adapter(ip / "ip-adapter.safetensors", bundle.transformer),
                        scale)
    encoder, processor = load_siglip_encoder(ip / "image_encoder", "cpu", torch.float32)
    return bundle, encode_sd3_ip_image(encoder, processor, reference_image(), "cpu")


def test_one_stage_equals_diffusers_sd3_ip_adapter(saved):
    from diffusers import StableDiffusion3Pipeline

    root, ip = saved
    bundle, embeds = _adapted(root, ip, 0.6)
    assert embeds.shape == (1, 16, SIGLIP_DIM)
    plan = validate_plan(bundle.family, [Stage(128, 128, 4)])
    opts = FlowGenerationOptions(PROMPT, guidance=7.0, seed=3)
    ours = FlowMegaFusionPipeline(bundle, SD3IPAdapterNetworks(FlowTorchNetworks(bundle), embeds)).generate(
        plan, opts).latent

    pipe = StableDiffusion3Pipeline.from_pretrained(str(root))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(ip), weight_name="ip-adapter.safetensors",
                         image_encoder_folder=str(ip / "image_encoder"))  # a path: diffusers' subfolder join needs one
    pipe.set_ip_adapter_scale(0.6)
    ref = pipe(PROMPT, height=128, width=128, num_inference_steps=4, guidance_scale=7.0,
               ip_adapter_image=reference_image(), generator=torch.Generator("cpu").manual_seed(3),
               output_type="latent").images
    assert _relerr(ours, ref) < 1e-5
    plain = FlowMegaFusionPipeline(load_model("tiny-sd3", str(root))).generate(plan, opts).latent
    assert _relerr(plain, ref) > 1e-3  # the adapter does act


def test_scale_zero_is_the_plain_image(saved):
    root, ip = saved
    bundle, embeds = _adapted(root, ip, 0.0)
    plan = validate_plan(bundle.family, [Stage(128, 128, 3)])
    opts = FlowGenerationOptions(PROMPT, guidance=5.0, seed=2)
    off = FlowMegaFusionPipeline(bundle, SD3IPAdapterNetworks(FlowTorchNetworks(bundle), embeds)).generate(plan, opts)
    plain = FlowMegaFusionPipeline(load_model("tiny-sd3", str(root))).generate(plan, opts)
    assert _relerr(off.latent, plain.latent) < 1e-6
    assert np.array_equal(off.image, plain.image)


def test_two_stages_project_at_every_step_graphed_as_eager(saved):
    """A 2-stage plan: the projection runs at each step's own timestep (one call per step, the CFG batch in one),
    other features give another latent, and with a ControlNet too the graphs mode's buffered step equals the eager
    one bit for bit."""
    root, ip = saved
    bundle, embeds = _adapted(root, ip, 1.0)
    plan = validate_plan(bundle.family, [Stage(128, 128, 2), Stage(160, 160, 2)])
    opts = FlowGenerationOptions(PROMPT, guidance=7.0, seed=1, relay="latent")
    seen = []
    hook = bundle.transformer.image_proj.register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape[0], float(args[1][0]))))
    eager = FlowMegaFusionPipeline(bundle, SD3IPAdapterNetworks(FlowTorchNetworks(bundle), embeds)).generate(
        plan, opts).latent
    hook.remove()
    assert [b for b, _ in seen] == [2] * plan.total_steps  # [zeros, features] with the CFG batch
    assert len({t for _, t in seen}) == plan.total_steps  # a new timestep each step, stage 2's re-shifted ones too
    other = FlowMegaFusionPipeline(bundle, SD3IPAdapterNetworks(FlowTorchNetworks(bundle), -embeds)).generate(
        plan, opts).latent
    assert eager.shape == (1, 16, 20, 20) and _relerr(other, eager) > 1e-4
    # With a ControlNet on top (it does not see the image tokens, as in StableDiffusion3ControlNetPipeline, whose
    # SD3ControlNetModel ignores them): the graphs mode's buffered step is the eager one, bit for bit.
    from megafusion.runtime.controlnet import Control
    from megafusion.runtime.flow_controlnet import ControlledFlowNetworks
    from tests.runtime.test_flow_controlnet import control_image, tiny_flow_controlnet

    control = Control(tiny_flow_controlnet(bundle.family, 1).eval(), control_image(128, 128), 0.8)

    def nets():
        return ControlledFlowNetworks(SD3IPAdapterNetworks(FlowTorchNetworks(bundle), embeds), [control], "cpu")

    controlled = FlowMegaFusionPipeline(bundle, nets()).generate(plan, opts).latent
    graphed = FlowMegaFusionPipeline(bundle, nets(), mode="graphs").generate(plan, opts).latent
    assert torch.equal(graphed, controlled) and _relerr(controlled, eager) > 1e-4


def test_flux_and_unet_adapters_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from tests.runtime.test_flow_ipadapter import save_tiny_flux_ip_adapter

    flux = save_tiny_flux_ip_adapter(load_model("tiny-flux").family.transformer, tmp_path / "flux.safetensors")
    with pytest.raises(IPAdapterError, match=r"'.*flux.safetensors': a FLUX IP-Adapter \(XLabs'"):
        check_sd3_ip_adapter_file(flux)
    unet = tmp_path / "unet.safetensors"  # the UNet / diffusers-FLUX layout: no time embedding, no norm_ip
    save_file({"image_proj.proj.weight": torch.zeros(8, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)},
              str(unet))
    with pytest.raises(IPAdapterError, match=r"'.*unet.safetensors': not an SD3 IP-Adapter \(no "
                                             r"image_proj.time_embedding.linear_1.weight"):
        check_sd3_ip_adapter_file(unet)
    torch.save({"image_proj": {}, "ip_adapter": {}}, str(tmp_path / "ip-adapter.bin"))
    with pytest.raises(IPAdapterError, match=r"ip-adapter.bin': not a readable safetensors file .*a pickled .bin"):
        check_sd3_ip_adapter_file(tmp_path / "ip-adapter.bin")
    bundle = load_model("tiny-sd3")
    cfg = bundle.family.transformer
    wide = save_tiny_sd3_ip_adapter(cfg, tmp_path / "wide.safetensors", width=32)
    with pytest.raises(IPAdapterError, match=r"wide.safetensors'.*layer 0's to_k_ip is \(32, 32\), the "
                                             r"transformer needs \(16, 16\)"):
        read_sd3_ip_adapter(wide, bundle.transformer)
    deep = save_tiny_sd3_ip_adapter(cfg, tmp_path / "deep.safetensors", layers=3)
    with pytest.raises(IPAdapterError, match=r"layers \['2'\]... beyond the transformer's 2 attention layers"):
        read_sd3_ip_adapter(deep, bundle.transformer)
    assert check_sd3_ip_adapter_file(save_tiny_sd3_ip_adapter(cfg, tmp_path / "ok.safetensors"))


def test_adapter_that_does_not_fit_leaves_the_transformer_as_it_was(tmp_path):
    """A tensor short (past the name and width checks): diffusers' strict load refuses it in one line, and neither
    the processors nor the image projection have been put in."""
    from safetensors.torch import load_file, save_file

    bundle = load_model("tiny-sd3")
    flat = load_file(str(save_tiny_sd3_ip_adapter(bundle.family.transformer, tmp_path / "ok.safetensors")))
    del flat["image_proj.layers.3.ff.net.2.weight"]
    save_file(flat, str(tmp_path / "short.safetensors"))
    before = {k: type(v) for k, v in bundle.transformer.attn_processors.items()}
    state = read_sd3_ip_adapter(tmp_path / "short.safetensors", bundle.transformer)
    with pytest.raises(IPAdapterError, match=r"^short: does not fit the transformer \(.*layers.3.ff.net.2.weight"):
        load_sd3_ip_adapter(bundle.transformer, state, 1.0, name="short")
    assert {k: type(v) for k, v in bundle.transformer.attn_processors.items()} == before
    assert getattr(bundle.transformer, "image_proj", None) is None


def test_mf_generate_sd3_ip_adapter_runs_and_refuses_before_the_load(saved, tmp_path, capsys, monkeypatch):
    """--ip-adapter on tiny-sd3: a 2-stage PNG that is not the plain one; a FLUX adapter or a CLIP encoder given
    to sd3 is one line naming it, before the model load (the load would fail the test)."""
    from megafusion.cli.generate import main
    from tests.runtime.test_flow_ipadapter import save_tiny_flux_ip_adapter
    from tests.runtime.test_ipadapter import save_tiny_image_encoder

    _, ip = saved
    reference_image().save(tmp_path / "r.png")
    common = ["--model", "tiny-sd3", "--prompt", "a red fox", "--stages", "128x128:2,160x160:1", "--relay",
              "latent", "--no-progress", "--ip-adapter-image", str(tmp_path / "r.png")]
    adapter = ["--ip-adapter", str(ip / "ip-adapter.safetensors"), "--ip-adapter-scale", "0.7"]
    assert main([*common, *adapter, "--ip-adapter-encoder", str(ip / "image_encoder"),
                 "--output", str(tmp_path / "ip.png")]) == 0
    assert f"ip-adapter: {ip / 'ip-adapter.safetensors'} (scale 0.7) in torch" in capsys.readouterr().out
    assert main([*common[:-2], "--output", str(tmp_path / "plain.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "ip.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "plain.png"), dtype=np.int16)
    assert a.shape == b.shape == (160, 160, 3) and np.abs(a - b).max() > 0

    flux = save_tiny_flux_ip_adapter(load_model("tiny-flux").family.transformer, tmp_path / "flux.safetensors")
    clip = save_tiny_image_encoder(tmp_path / "clip")
    capsys.readouterr()

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("megafusion.core.loading.load_model", no_load)
    for argv, message in (
            (["--ip-adapter", str(flux), "--ip-adapter-encoder", str(ip / "image_encoder")],
             f"--ip-adapter {str(flux)!r}: a FLUX IP-Adapter"),
            ([*adapter, "--ip-adapter-encoder", str(clip)],
             f"--ip-adapter-encoder {str(clip)!r}: a 'clip_vision_model' model; SD3's IP-Adapter takes a SigLIP")):
        rc = main([*common, *argv, "--output", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.png").exists()


@pytest.mark.gpu
def test_cuda_graph_holds_sd3_ip_adapter_and_matches_eager(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    b = load_model("tiny-sd3", device="cuda", dtype=torch.float32)
    ip = save_tiny_sd3_ip_adapter(b.family.transformer, tmp_path / "ip.safetensors")
    load_sd3_ip_adapter(b.transformer, read_sd3_ip_adapter(ip, b.transformer), 0.8)
    embeds = torch.randn((1, 16, SIGLIP_DIM), generator=torch.Generator().manual_seed(2))
    plan = validate_plan(b.family, [Stage(128, 128, 3), Stage(192, 160, 2)])
    opts = FlowGenerationOptions(PROMPT, guidance=7.0, seed=1)
    eager = FlowMegaFusionPipeline(b, SD3IPAdapterNetworks(FlowTorchNetworks(b), embeds)).generate(plan, opts).latent
    pipe = FlowMegaFusionPipeline(b, SD3IPAdapterNetworks(FlowTorchNetworks(b), embeds), mode="graphs")
    graphed = pipe.generate(plan, opts).latent
    assert pipe.graphs.captures == 2 and pipe.graphs.replays == plan.total_steps
    assert _relerr(graphed, eager) < 1e-4  # same kernels; cuBLAS may pick another algorithm in a capture
    plain = FlowMegaFusionPipeline(b).generate(plan, opts).latent
    assert _relerr(plain, eager) > 1e-3
