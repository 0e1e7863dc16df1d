"""LoRA fused into the weights (core/lora.py): the same latents as diffusers' `load_lora_weights` + `fuse_lora`
(needs peft; skipped without it), kohya and diffusers files of one LoRA fuse to the same weights, the engine
fingerprint sees the fuse, and bad files are refused naming the file and the key.

The LoRAs are made here: random down/up matrices on the attention projections of the UNet and the text
encoder(s), saved with safetensors. Tolerance: 1e-5 relative on the final latent (float32 on CPU)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megafusion.core.loading import load_model
from megafusion.core.lora import LoraError, LoraSpec, fuse_loras, parse_lora
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.cache import weights_fingerprint
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from tests.helpers import random_lora, save_lora_file

RANK = 4
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _layers(bundle):
    """(network, module name, Linear) for every adapted layer."""
    out = [("unet", n, m) for n, m in bundle.unet.named_modules() if n.endswith(UNET_TARGETS)]
    for i, enc in enumerate(bundle.text_encoders):
        net = "text_encoder" if i == 0 else "text_encoder_2"
        out += [(net, n, m) for n, m in enc.named_modules() if n.endswith(TEXT_TARGETS)]
    return out


def _random_lora(bundle, seed=0):
    return random_lora(_layers(bundle), RANK, seed)


def save_diffusers(lora, path):
    return save_lora_file(lora, path)


def save_kohya(lora, path, alpha, xl=False):
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    state = {}
    for (net, name), (down, up) in lora.items():
        key = prefixes[net] + name.replace(".", "_")
        state.update({f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(),
                      f"{key}.alpha": torch.tensor(float(alpha))})
    save_file(state, str(path))
    return path


def _relerr(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _weights(bundle):
    return [m.weight.detach().clone() for _, _, m in _layers(bundle)]


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_kohya_and_diffusers_files_fuse_alike(model, tmp_path):
    base = load_model(model)
    lora = _random_lora(base)
    a, b = load_model(model), load_model(model)
    fuse_loras(a, [LoraSpec(save_diffusers(lora, tmp_path / "d.safetensors"), 0.5)])
    # alpha = r / 2 halves the update; scale 1 then gives the same weights as the diffusers file at 0.5
    fuse_loras(b, [LoraSpec(save_kohya(lora, tmp_path / "k.safetensors", RANK / 2, base.family.is_xl), 1.0)])
    for (net, name, m), wa, wb, w0 in zip(_layers(base), _weights(a), _weights(b), _weights(base)):
        down, up = lora[(net, name)]
        assert torch.allclose(wa, w0 + 0.5 * up @ down, atol=1e-6), name
        assert torch.allclose(wa, wb, atol=1e-6), name


def test_fingerprint_holds_the_lora_and_its_scale(tmp_path):
    """The engine key's weights fingerprint hashes the fused weights: a LoRA, or another scale, is another key."""
    path = save_diffusers(_random_lora(load_model("tiny-sd15")), tmp_path / "l.safetensors")
    prints = []
    for specs in ([], [LoraSpec(path, 1.0)], [LoraSpec(path, 0.7)]):
        bundle = load_model("tiny-sd15")
        fuse_loras(bundle, specs)
        prints.append(weights_fingerprint(bundle.unet))
    assert len(set(prints)) == 3


@pytest.mark.parametrize("model,kind", [("tiny-sd15", "diffusers"), ("tiny-sdxl", "kohya")])
def test_same_latents_as_diffusers_fuse_lora(model, kind, tmp_path, request):
    pytest.importorskip("peft")  # diffusers' LoRA loading needs it; the deployment machines have none
    from tests.runtime.test_reference_diffusers import _diffusers_pipe

    base = request.getfixturevalue(model.replace("-", "_"))  # the session's, never fused
    lora, xl = _random_lora(base, seed=1), base.family.is_xl
    path = (save_diffusers(lora, tmp_path / "l.safetensors") if kind == "diffusers"
            else save_kohya(lora, tmp_path / "l.safetensors", 2.0, xl))
    fam = base.family
    ours = load_model(model)
    fuse_loras(ours, [LoraSpec(path, 0.8)])
    plan = validate_plan(fam, [Stage(fam.native_height, fam.native_width, 4)])
    got = MegaFusionPipeline(ours).generate(plan, GenerationOptions("a kite", seed=3, reschedule=False, dilation=1))

    pipe = _diffusers_pipe(load_model(model))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    ref = pipe("a kite", height=fam.native_height, width=fam.native_width, num_inference_steps=4, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert _relerr(got.latent, ref) < 1e-5
    unfused = MegaFusionPipeline(base).generate(plan, GenerationOptions("a kite", seed=3, reschedule=False,
                                                                        dilation=1))
    assert _relerr(unfused.latent, ref) > 1e-3  # the LoRA does change the result


def test_parse_lora():
    assert parse_lora("a/b.safetensors") == LoraSpec(__import__("pathlib").Path("a/b.safetensors"), 1.0)
    assert parse_lora("a/b.safetensors:0.6").scale == 0.6
    assert parse_lora("c:/x:y.safetensors").path.name == "x:y.safetensors"


def test_bad_files_refused_naming_them(tmp_path, tiny_sd15):
    bundle = load_model("tiny-sd15")
    before = weights_fingerprint(bundle.unet)
    with pytest.raises(LoraError, match="no such file"):
        fuse_loras(bundle, [LoraSpec(tmp_path / "none.safetensors")])
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        fuse_loras(bundle, [LoraSpec(tmp_path / "junk.safetensors")])
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(LoraError, match=r"unknown key 'unet.no_such_block.to_q.lora_A.weight'"):
        fuse_loras(bundle, [LoraSpec(tmp_path / "u.safetensors")])
    save_file({"vae.encoder.x.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(LoraError, match="unknown key 'vae.encoder.x.lora_A.weight'"):
        fuse_loras(bundle, [LoraSpec(tmp_path / "v.safetensors")])
    # an SDXL LoRA on SD1.5: its layers are missing or of other widths
    path = save_diffusers(_random_lora(load_model("tiny-sdxl")), tmp_path / "xl.safetensors")
    with pytest.raises(LoraError, match="xl.safetensors.*(unknown key|another architecture)"):
        fuse_loras(bundle, [LoraSpec(path)])
    net, name, layer = _layers(bundle)[0]
    wide = {(net, name): (torch.zeros(RANK, layer.in_features + 8), torch.zeros(layer.out_features, RANK))}
    with pytest.raises(LoraError, match=f"unet.{name} is {layer.out_features}x{layer.in_features + 8} in the LoRA but "
                                        f"{layer.out_features}x{layer.in_features} in tiny-sd15"):
        fuse_loras(bundle, [LoraSpec(save_diffusers(wide, tmp_path / "w.safetensors"))])
    assert weights_fingerprint(bundle.unet) == before  # nothing was fused by a refused file
