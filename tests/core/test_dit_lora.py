"""LoRA fused into SD3 / FLUX (core/lora.py with core/dit_lora.py): every adapted layer holds W + scale (alpha / r)
B A as computed in float64 here, the other weights are untouched, a scale of 0 gives the base image exactly, a kohya
FLUX file lands on diffusers' layers, and files for another architecture are refused naming the file and the key.
diffusers' own `load_lora_weights` + `fuse_lora` needs peft: that comparison skips without it.

The LoRAs are made here: random matrices on the transformer's attention projections and the CLIP encoders', saved
with safetensors in the layout `save_lora_weights` writes. Tolerance: the fused float32 weight against the float64
sum, 1e-6 relative per layer (one float32 rounding of the sum)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megafusion.core.loading import load_model
from megafusion.core.lora import LoraError, LoraSpec, fuse_loras
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.cache import weights_fingerprint
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline
from tests.helpers import random_lora, save_lora_file

RANK = 4
ALPHA = 8.0
DIT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.to_add_out",
               "proj_mlp")
TEXT_TARGETS = ("q_proj", "v_proj")


def _layers(bundle):
    """(network, module name, Linear) for every adapted layer."""
    out = [("transformer", n, m) for n, m in bundle.transformer.named_modules()
           if n.endswith(DIT_TARGETS) and isinstance(m, torch.nn.Linear)]
    clips = ["text_encoder", "text_encoder_2"][:len(bundle.text_encoders) - 1]  # T5 is never adapted
    for net, enc in zip(clips, bundle.text_encoders):
        out += [(net, n, m) for n, m in enc.named_modules() if n.endswith(TEXT_TARGETS)]
    return out


def _random_lora(bundle, seed=0):
    return random_lora(_layers(bundle), RANK, seed)


def save_diffusers(lora, path, alpha=None):
    """As `save_lora_weights` writes it; with `alpha`, the adapter metadata giving each network's lora_alpha."""
    meta = None
    if alpha is not None:
        nets = {net for net, _ in lora}
        meta = {"lora_adapter_metadata": json.dumps({f"{n}.{k}": v for n in nets
                                                     for k, v in (("r", RANK), ("lora_alpha", alpha))})}
    return save_lora_file(lora, path, meta)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_fused_weights_are_w_plus_scaled_ba(model, tmp_path):
    bundle = load_model(model)
    layers = _layers(bundle)
    assert len({net for net, _, _ in layers}) == (3 if model == "tiny-sd3" else 2)
    lora = _random_lora(bundle)
    base = {name: p.detach().clone() for name, p in bundle.transformer.named_parameters()}
    before = {(net, name): m.weight.detach().double().clone() for net, name, m in layers}
    t5 = weights_fingerprint(bundle.text_encoders[-1])
    fuse_loras(bundle, [LoraSpec(save_diffusers(lora, tmp_path / "l.safetensors", ALPHA), 0.7)])
    for net, name, m in layers:
        down, up = lora[(net, name)]
        want = before[(net, name)] + 0.7 * (ALPHA / RANK) * (up.double() @ down.double())
        err = float((m.weight.double() - want).norm() / want.norm())
        assert err < 1e-6, (net, name, err)
    adapted = {f"{name}.weight" for net, name, _ in layers if net == "transformer"}
    for name, p in bundle.transformer.named_parameters():
        if name in adapted:
            assert not torch.equal(p, base[name])
        else:
            assert torch.equal(p, base[name]), name
    assert weights_fingerprint(bundle.text_encoders[-1]) == t5


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_scale_zero_is_the_base_image(model, tmp_path):
    base = load_model(model)
    path = save_diffusers(_random_lora(base), tmp_path / "l.safetensors")
    plan = validate_plan(base.family, [Stage(128, 128, 1)])
    opts = FlowGenerationOptions("a kite", guidance=base.family.default_guidance, seed=3, relay="latent")
    want = FlowMegaFusionPipeline(base).generate(plan, opts)
    zero = load_model(model)
    fuse_loras(zero, [LoraSpec(path, 0.0)])
    assert torch.equal(FlowMegaFusionPipeline(zero).generate(plan, opts).latent, want.latent)
    one = load_model(model)
    fuse_loras(one, [LoraSpec(path, 1.0)])
    assert not torch.equal(FlowMegaFusionPipeline(one).generate(plan, opts).latent, want.latent)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_same_latents_as_diffusers_fuse_lora(model, tmp_path):
    pytest.importorskip("peft")  # diffusers' LoRA loading needs it; the deployment machines have none
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from tests.runtime.test_flow_reference import save_tiny

    save_tiny(model, tmp_path / "m")
    base = load_model(model, str(tmp_path / "m"))
    path = save_diffusers(_random_lora(base, seed=1), tmp_path / "l.safetensors")
    fuse_loras(base, [LoraSpec(path, 0.8)])
    plan = validate_plan(base.family, [Stage(128, 128, 4)])
    g = base.family.default_guidance
    got = FlowMegaFusionPipeline(base).generate(plan, FlowGenerationOptions("a kite", guidance=g, seed=3)).latent
    pipe = (StableDiffusion3Pipeline if model == "tiny-sd3" else FluxPipeline).from_pretrained(tmp_path / "m")
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    ref = pipe("a kite", height=128, width=128, num_inference_steps=4, guidance_scale=g,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    if model == "tiny-flux":
        from megafusion.engine.flow_networks import pack

        got = pack(got)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_kohya_flux_file_lands_on_diffusers_layers(tmp_path):
    """BFL names: a fused img QKV splits into to_q/to_k/to_v (each its rows of up, the shared down), the output
    projection and a single block's linear2 map one to one, lora_te1_ is CLIP-L; alpha / r scales each."""
    bundle = load_model("tiny-flux")
    t = bundle.transformer
    blk, single = t.transformer_blocks[0].attn, t.single_transformer_blocks[0]
    d, inner = blk.to_q.in_features, blk.to_q.out_features
    clip = bundle.text_encoders[0]
    clip_q = getattr(clip, "text_model", clip).encoder.layers[0].self_attn.q_proj  # transformers 5 has no text_model
    g = torch.Generator().manual_seed(0)

    def pair(out_f, in_f):
        return torch.randn(RANK, in_f, generator=g) * 0.3, torch.randn(out_f, RANK, generator=g) * 0.3

    files = {"lora_unet_double_blocks_0_img_attn_qkv": pair(3 * inner, d),
             "lora_unet_double_blocks_0_img_attn_proj": pair(blk.to_out[0].out_features, blk.to_out[0].in_features),
             "lora_unet_single_blocks_0_linear2": pair(single.proj_out.out_features, single.proj_out.in_features),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": pair(clip_q.out_features, clip_q.in_features)}
    state = {}
    for key, (down, up) in files.items():
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
    save_file(state, str(tmp_path / "k.safetensors"))
    layers = {"q": blk.to_q, "k": blk.to_k, "v": blk.to_v, "proj": blk.to_out[0], "lin2": single.proj_out,
              "clip": clip_q}
    before = {n: m.weight.detach().double().clone() for n, m in layers.items()}
    fuse_loras(bundle, [LoraSpec(tmp_path / "k.safetensors", 1.5)])
    f = 1.5 * 2.0 / RANK
    down, up = files["lora_unet_double_blocks_0_img_attn_qkv"]
    want = {p: f * up[i * inner:(i + 1) * inner].double() @ down.double() for i, p in enumerate("qkv")}
    for n, key in (("proj", "lora_unet_double_blocks_0_img_attn_proj"), ("lin2", "lora_unet_single_blocks_0_linear2"),
                   ("clip", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")):
        want[n] = f * files[key][1].double() @ files[key][0].double()
    for n, m in layers.items():
        expect = before[n] + want[n]
        assert float((m.weight.double() - expect).norm() / expect.norm()) < 1e-6, n


def test_lora_for_another_architecture_is_refused(tmp_path):
    sd3 = load_model("tiny-sd3")
    flux = load_model("tiny-flux")
    sd15 = load_model("tiny-sd15")
    before = weights_fingerprint(sd3.transformer)
    dit_file = save_diffusers(_random_lora(sd3), tmp_path / "sd3.safetensors")
    unet_file = tmp_path / "unet.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(unet_file))
    kohya_sd = tmp_path / "kohya_sd.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(kohya_sd))
    odd = tmp_path / "odd.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.zeros(4)}, str(odd))
    cases = ((sd3, unet_file, "unknown key 'unet.down_blocks.0"),
             (sd15, dit_file, "unknown key '(transformer|text_encoder_2)[.]"),
             (flux, dit_file, "(unknown key|another architecture)"),
             (sd3, kohya_sd, "a kohya-format file"),
             (flux, kohya_sd, "(keys the FLUX layout does not have|not a kohya FLUX LoRA)"),
             (flux, odd, "unknown key 'lora_unet_double_blocks_0_img_attn_proj.diff_b'"))
    for bundle, path, message in cases:
        with pytest.raises(LoraError, match=f"--lora '{path}'.*{message}") as e:
            fuse_loras(bundle, [LoraSpec(path)])
        assert "\n" not in str(e.value)
    assert weights_fingerprint(sd3.transformer) == before  # nothing was fused by a refused file


def test_clip_layers_named_as_transformers_4_did_resolve(tmp_path):
    """Files name CLIP layers `text_model.encoder...` (kohya: `lora_te_text_model_encoder_...`); transformers 5's
    CLIPTextModel has no `text_model` level. Both layouts land on the same layer (SD1.5 kohya, SD3 diffusers)."""
    sd15, sd3 = load_model("tiny-sd15"), load_model("tiny-sd3")
    clip = sd15.text_encoders[0]
    layer = getattr(clip, "text_model", clip).encoder.layers[0].self_attn.q_proj
    down, up = torch.ones(RANK, layer.in_features), torch.ones(layer.out_features, RANK) * 0.01
    save_file({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up},
              str(tmp_path / "k.safetensors"))
    before = layer.weight.detach().clone()
    fuse_loras(sd15, [LoraSpec(tmp_path / "k.safetensors")])
    assert torch.allclose(layer.weight, before + up @ down)
    clip = sd3.text_encoders[0]
    layer = getattr(clip, "text_model", clip).encoder.layers[0].self_attn.q_proj
    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up},
              str(tmp_path / "d.safetensors"))
    before = layer.weight.detach().clone()
    fuse_loras(sd3, [LoraSpec(tmp_path / "d.safetensors")])
    assert torch.allclose(layer.weight, before + up @ down)
