"""ControlNet through the relay (runtime/controlnet.py, docs/ALGORITHM.md §16).

Reference: diffusers' StableDiffusionControlNetPipeline (and the SDXL one) with DDIM, fed the same modules and a
tiny ControlNet (`ControlNetModel.from_unet` of the tiny UNet, its zero convolutions given random weights so that
its residuals are not zero), saved and loaded back. Tolerance: 1e-5 relative on the final latent (float32 CPU).
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.families import SD_SCHEDULER_CONFIG
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.controlnet import (Control, ControlInputError, ControlledNetworks, keep, load_controlnet,
                                           read_control_image)
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

PROMPT = "a bridge over a river"


def _relerr(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def save_tiny_controlnet(unet, path, seed=0):
    """A ControlNet copied from the UNet, with random (not zero) output convolutions, saved as diffusers saves."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.save_pretrained(str(path))
    return path


def control_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand((1, 3, 4, 4), generator=g), size=(h, w), mode="nearest")


def _diffusers_controlnet_pipe(bundle, controlnet):
    from diffusers import (DDIMScheduler, StableDiffusionControlNetPipeline,
                           StableDiffusionXLControlNetPipeline)

    sched = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    if bundle.family.is_xl:
        return StableDiffusionXLControlNetPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet,
            controlnet=controlnet, scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionControlNetPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        controlnet=controlnet, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl"])
def test_one_stage_equals_diffusers_controlnet(name, request, tmp_path):
    bundle = request.getfixturevalue(name)
    fam = bundle.family
    h, w, steps = fam.native_height, fam.native_width, 5
    cnet = load_controlnet(save_tiny_controlnet(bundle.unet, tmp_path / "cn"), bundle.unet, "cpu", torch.float32)
    image = control_image(h, w)
    control = Control(cnet, image, scale=0.7, start=0.2, end=0.8)  # steps 2..4 of 5 conditioned
    plan = validate_plan(fam, [Stage(h, w, steps)])
    opts = GenerationOptions(PROMPT, guidance=6.0, seed=7, reschedule=False, dilation=1)
    nets = ControlledNetworks(TorchNetworks(bundle), [control], "cpu")
    ours = MegaFusionPipeline(bundle, nets, "cpu").generate(plan, opts)

    pipe = _diffusers_controlnet_pipe(bundle, cnet)
    ref = pipe(PROMPT, image=image, height=h, width=w, num_inference_steps=steps, guidance_scale=6.0,
               controlnet_conditioning_scale=0.7, control_guidance_start=0.2, control_guidance_end=0.8,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert _relerr(ours.latent, ref) < 1e-5
    plain = MegaFusionPipeline(bundle).generate(plan, opts)
    assert _relerr(plain.latent, ref) > 1e-4  # the ControlNet does act


def test_relay_with_two_controlnets_graphed_matches_eager(tiny_sd15, tmp_path):
    """Two ControlNets over a 2-stage plan (control images resized per stage, dilated mid blocks): the buffered
    step the CUDA graphs capture gives the eager loop's latent, and scale 0 gives the plain plan's."""
    fam = tiny_sd15.family
    a = load_controlnet(save_tiny_controlnet(tiny_sd15.unet, tmp_path / "a", 1), tiny_sd15.unet, "cpu", torch.float32)
    b = load_controlnet(save_tiny_controlnet(tiny_sd15.unet, tmp_path / "b", 2), tiny_sd15.unet, "cpu", torch.float32)
    plan = validate_plan(fam, [Stage(128, 128, 2), Stage(192, 192, 1)])
    opts = GenerationOptions(PROMPT, seed=1)
    controls = [Control(a, control_image(100, 90, 1), 0.8), Control(b, control_image(64, 64, 2), 0.5, 0.0, 0.5)]
    eager = MegaFusionPipeline(tiny_sd15, ControlledNetworks(TorchNetworks(tiny_sd15), controls, "cpu"), "cpu")
    fast = MegaFusionPipeline.fast(tiny_sd15, ControlledNetworks(TorchNetworks(tiny_sd15), controls, "cpu"), "cpu")
    x = eager.generate(plan, opts).latent
    assert _relerr(fast.generate(plan, opts).latent, x) < 1e-6
    off = [Control(a, control_image(100, 90, 1), 0.0)]
    zero = MegaFusionPipeline(tiny_sd15, ControlledNetworks(TorchNetworks(tiny_sd15), off, "cpu"), "cpu")
    plain = MegaFusionPipeline(tiny_sd15).generate(plan, opts).latent
    assert _relerr(zero.generate(plan, opts).latent, plain) < 1e-6
    assert _relerr(x, plain) > 1e-4


def test_keep_is_diffusers_rule():
    assert [keep(i, 5, 0.2, 0.8) for i in range(5)] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert [keep(i, 4, 0.0, 1.0) for i in range(4)] == [1.0] * 4


def test_bad_controls_refused(tiny_sd15, tiny_sdxl, tmp_path):
    with pytest.raises(ControlInputError, match="need 0 <= start < end <= 1"):
        Control(torch.nn.Identity(), control_image(8, 8), start=0.6, end=0.5)
    with pytest.raises(ControlInputError, match="not a diffusers ControlNetModel folder"):
        load_controlnet(tmp_path, tiny_sd15.unet, "cpu", torch.float32)
    xl = save_tiny_controlnet(tiny_sdxl.unet, tmp_path / "xl")
    with pytest.raises(ControlInputError, match="a ControlNet for another architecture"):
        load_controlnet(xl, tiny_sd15.unet, "cpu", torch.float32)
    with pytest.raises(ControlInputError, match="no such file"):
        read_control_image(tmp_path / "none.png")


@pytest.mark.gpu
def test_controlnet_captured_in_the_step_graph_on_cuda(tmp_path):
    """On CUDA the graphed loop captures ControlNet and UNet in one step graph per stage shape and gives the eager
    loop's latent (fp32; both paths run the same kernels, so the difference is rounding only)."""
    from megafusion.core.loading import load_model

    bundle = load_model("tiny-sd15", device="cuda", dtype=torch.float32)
    cnet = load_controlnet(save_tiny_controlnet(bundle.unet, tmp_path / "cn"), bundle.unet, "cuda", torch.float32)
    plan = validate_plan(bundle.family, [Stage(128, 128, 4), Stage(192, 192, 2)])
    opts = GenerationOptions(PROMPT, seed=3)
    controls = [Control(cnet, control_image(128, 128), 0.8, 0.1, 0.9)]
    eager = MegaFusionPipeline(bundle, ControlledNetworks(TorchNetworks(bundle), controls, "cuda"), "cuda")
    fast = MegaFusionPipeline.fast(bundle, ControlledNetworks(TorchNetworks(bundle), controls, "cuda"), "cuda")
    x = eager.generate(plan, opts).latent
    y = fast.generate(plan, opts).latent
    assert fast.graphs.captures == 2 and fast.nets.calls[0].counters["traced"] == 2
    assert _relerr(y, x) < 1e-3
    y2 = fast.generate(plan, GenerationOptions(PROMPT, seed=3)).latent  # replayed, not recaptured
    assert fast.graphs.captures == 2 and _relerr(y2, y) < 1e-6


def test_fast_backend_prepares_the_controlnet_as_its_unet(tmp_path):
    """--mode fast-graphs (nothing compiled): the ControlNet gets the UNet's changes (fused QKV, its attention kernel,
    channels_last) and runs as the module itself, with the plain modules' latent (1e-5, float32 CPU)."""
    from megafusion.core.loading import load_model
    from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks

    ref_bundle, fast_bundle = load_model("tiny-sd15"), load_model("tiny-sd15")
    path = save_tiny_controlnet(ref_bundle.unet, tmp_path / "cn")
    ref_cn, fast_cn = (load_controlnet(path, b.unet, "cpu", torch.float32) for b in (ref_bundle, fast_bundle))
    plan = validate_plan(ref_bundle.family, [Stage(128, 128, 2), Stage(192, 192, 1)])
    opts = GenerationOptions(PROMPT, seed=3)
    nets = FastTorchNetworks(fast_bundle, FastOptions(compile_unet=False, compile_vae=False, cudnn_benchmark=False))
    before = nets.released_bytes
    fast = ControlledNetworks(nets, [Control(fast_cn, control_image(128, 128), 0.8)], "cpu")
    assert fast.calls == [fast_cn] and nets.precompiled == []
    assert any(getattr(m, "fused_projections", False) for m in fast_cn.modules())
    assert nets.released_bytes > before  # its separate Q, K, V are views of the fused weights now
    ref = ControlledNetworks(TorchNetworks(ref_bundle), [Control(ref_cn, control_image(128, 128), 0.8)], "cpu")
    x = MegaFusionPipeline(ref_bundle, ref, "cpu").generate(plan, opts).latent
    y = MegaFusionPipeline(fast_bundle, fast, "cpu").generate(plan, opts).latent
    assert _relerr(y, x) < 1e-5


@pytest.mark.slow
def test_compiled_controlnet_kept_and_loaded_cpu(tmp_path, monkeypatch):
    """--mode compiled: the ControlNet compiled at a call site of its own, one function per stage shape and
    dilation, kept in the compile cache's folder under its configuration's name; networks made anew (a warm start)
    load those functions and trace nothing; both give the eager loop's latent (1e-4). Compiled with `aot_eager`
    where this torch precompiles with it (tests/engine/test_precompiled.py `_backend`: Inductor's C++ builds took
    81 s of CI here); the Inductor round trip is tests/engine/test_compile_cache.py's."""
    from megafusion.core.loading import load_model
    from megafusion.engine import torch_fast
    from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks

    from tests.engine.test_precompiled import _backend

    monkeypatch.setattr(torch_fast, "compile_with", lambda fn, options, guard_filter=None: torch.compile(
        fn, fullgraph=True, dynamic=False, backend=_backend(), options={"guard_filter_fn": guard_filter}))

    plan = validate_plan(load_model("tiny-sd15").family, [Stage(128, 128, 2), Stage(192, 192, 1)])
    opts = GenerationOptions(PROMPT, seed=3)
    path = save_tiny_controlnet(load_model("tiny-sd15").unet, tmp_path / "cn")

    def run(fast: bool):
        bundle = load_model("tiny-sd15")
        cn = load_controlnet(path, bundle.unet, "cpu", torch.float32)
        nets = TorchNetworks(bundle)
        if fast:
            nets = FastTorchNetworks(bundle, FastOptions(compile_vae=False, cudnn_benchmark=False))
            nets.keep_compiled(tmp_path / "functions")
        controlled = ControlledNetworks(nets, [Control(cn, control_image(128, 128), 0.8)], "cpu")
        return MegaFusionPipeline(bundle, controlled, "cpu").generate(plan, opts).latent, controlled

    eager, _ = run(False)
    first, controlled = run(True)
    site = controlled.calls[0]
    assert site.name.startswith("controlnet-") and site.counters == {"traced": 2, "loaded": 0, "saved": 2,
                                                                      "rejected": 0}
    assert len(list((tmp_path / "functions").glob(f"{site.name}-*.bin"))) == 2  # 128x128 standard, 192x192 dilated
    second, controlled = run(True)
    assert controlled.calls[0].counters == {"traced": 0, "loaded": 2, "saved": 0, "rejected": 0}
    assert _relerr(first, eager) < 1e-4 and _relerr(second, eager) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_cuda_compiled_mode_with_controlnet_matches_eager(name, tmp_path, no_tf32):
    """--mode compiled as mf-generate builds it (FastTorchNetworks under ControlledNetworks, the fast pipeline): the
    UNet compiled taking the ControlNet's residuals as inputs, the ControlNet compiled at its own call site, both in
    one graph per stage shape; the latent within 1e-3 of the eager loop's (fp32: Inductor reorders the
    reductions). cuDNN's TF32 off, as in every GPU test comparing two implementations: with it on, the H200 gave
    1.3e-3 (tiny-sd15) and 2.0e-3 (with the ControlNet eager, d434125)."""
    from megafusion.core.loading import load_model
    from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks

    bundle = load_model(name, device="cuda", dtype=torch.float32)
    cnet = load_controlnet(save_tiny_controlnet(bundle.unet, tmp_path / "cn"), bundle.unet, "cuda", torch.float32)
    plan = validate_plan(bundle.family, [Stage(128, 128, 3), Stage(192, 192, 2)])
    opts = GenerationOptions(PROMPT, seed=3)
    controls = [Control(cnet, control_image(128, 128), 0.8, 0.1, 0.9)]
    eager = MegaFusionPipeline(bundle, ControlledNetworks(TorchNetworks(bundle), controls, "cuda"), "cuda")
    x = eager.generate(plan, opts).latent  # before FastTorchNetworks changes the modules in place
    plain = MegaFusionPipeline(bundle).generate(plan, opts).latent
    nets = FastTorchNetworks(bundle, FastOptions())
    fast = MegaFusionPipeline.fast(bundle, ControlledNetworks(nets, controls, "cuda"), "cuda")
    y = fast.generate(plan, opts).latent
    assert fast.graphs.captures == 2
    assert _relerr(y, x) < 1e-3
    assert _relerr(x, plain) > 1e-2  # the ControlNet acts, so the match above is the controlled step's
    y2 = fast.generate(plan, opts).latent  # replayed, not recaptured
    assert fast.graphs.captures == 2 and _relerr(y2, y) < 1e-6
