"""ONNX Runtime engines of the SD3 and FLUX transformers (engine/dit_onnx_engines.py): one dynamic engine per folder
entry whose profile covers the plan's range of sides; it gives the torch module's velocity at two stage shapes and
the torch loop's latent (float32, CPU: 1e-4 relative), and a plan or folder it does not serve is refused before
any model load. Which kind of transformer engines a folder runs from (engine/dit_engines.choose_dit_engines)."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.backend import get_backend
from megafusion.engine.cache import EngineCache, EngineError, EngineKey, device_name, weights_fingerprint
from megafusion.engine.dit_engines import DIT_BACKENDS, choose_dit_engines, dit_engine_kinds, dit_requirements
from megafusion.engine.dit_onnx_engines import (build_dit_onnx_engine, check_dit_onnx_engine, describe_dit_range,
                                                dit_onnx_spec, dit_range_profile, onnx_engine_networks)
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

pytest.importorskip("onnxruntime")

STAGES = [Stage(128, 128, 2), Stage(160, 192, 2)]  # Stage(height, width, steps): latents 16x16, 20x24


def _relerr(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_registry_names_the_backends_and_their_precisions():
    assert tuple(dit_engine_kinds()) == DIT_BACKENDS == ("aoti", "onnxruntime")
    fam = load_model("tiny-sd3").family
    assert dit_onnx_spec(fam, "fp16").inputs[0].dtype == "float16"
    with pytest.raises(ValueError, match="'bf16': onnxruntime transformer engines are fp32, fp16"):
        dit_onnx_spec(fam, "bf16")


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_range_profile_spans_the_plan(name):
    fam = load_model(name).family
    plan = validate_plan(fam, STAGES)
    spec = dit_onnx_spec(fam, "fp32")
    p = dit_range_profile(fam, spec, plan, 1)
    _, lo, opt, hi = p.shapes[0]
    if fam.kind == "sd3":
        assert (lo, opt, hi) == ((1, 16, 16, 16), (1, 16, 16, 16), (2, 16, 24, 24))
        assert describe_dit_range(fam, p) == "128x128 to 192x192 at batch 1 to 2"
    else:  # tokens: (latent side / 2)^2; positions: text tokens + tokens
        assert (lo[:2], opt[:2], hi[:2]) == ((1, 64), (1, 64), (2, 144))
        assert dict((n, h) for n, _, _, h in p.shapes)["rotary_cos"] == (fam.t5_max_length + 144, 16)
        assert describe_dit_range(fam, p) == "64 to 144 latent tokens (128x128 to 192x192) at batch 1 to 2"


@pytest.fixture(scope="module", params=["tiny-sd3", pytest.param("tiny-flux", marks=pytest.mark.slow)])
def built(request, tmp_path_factory):
    """(bundle, plan, folder) with the ONNX Runtime engine of STAGES at the family's default guidance batch.
    FLUX's dynamo export takes ~20-40 s on 2 shared cores: slow."""
    bundle = load_model(request.param)
    fam = bundle.family
    plan = validate_plan(fam, STAGES)
    folder = tmp_path_factory.mktemp(request.param)
    batch = 2 if fam.cfg else 1
    lines: list[str] = []
    assert build_dit_onnx_engine(bundle, plan, "fp32", folder, batch, log=lines.append) == 1
    assert "building for onnxruntime" in lines[0] and " done in " in lines[-1]
    assert build_dit_onnx_engine(bundle, plan, "fp32", folder, batch, log=lines.append) == 0  # valid: kept
    assert "up to date" in lines[-1] and len(EngineCache(folder).entries()) == 1
    return bundle, plan, folder


def test_velocity_equals_torch_at_two_stage_shapes(built):
    bundle, plan, folder = built
    fam = bundle.family
    ours, torch_nets = onnx_engine_networks(bundle, folder, "cpu", "fp32"), FlowTorchNetworks(bundle)
    assert not ours.capturable  # declared by the backend (its sessions bind their own CUDA stream)
    g = torch.Generator().manual_seed(3)
    batch = 2 if fam.cfg else 1
    for s in plan.stages:
        z = torch.randn(batch, fam.latent_channels, s.height // fam.vae_scale, s.width // fam.vae_scale, generator=g)
        states = torch.randn(batch, *_text_shape(fam), generator=g)
        pooled = torch.randn(batch, fam.transformer["pooled_projection_dim"], generator=g)
        t = torch.full([batch], 700.0)
        want = torch_nets.velocity(z, t, states, pooled, 3.5)
        got = ours.velocity(z, t, states, pooled, 3.5)
        assert got.shape == want.shape and _relerr(got, want) < 1e-4


def _text_shape(fam) -> tuple[int, int]:
    from megafusion.core.dit_specs import sd3_text_length

    length = sd3_text_length(fam) if fam.kind == "sd3" else fam.t5_max_length
    return length, fam.transformer["joint_attention_dim"]


def test_flow_loop_on_the_engine_equals_torch(built):
    bundle, plan, folder = built
    opts = FlowGenerationOptions("a red fox", guidance=bundle.family.default_guidance, seed=2)
    want = FlowMegaFusionPipeline(bundle).generate(plan, opts).latent
    nets = onnx_engine_networks(bundle, folder, "cpu", "fp32")
    assert _relerr(FlowMegaFusionPipeline(bundle, nets).generate(plan, opts).latent, want) < 1e-4


def test_plans_and_folders_it_does_not_serve_are_refused(built, tmp_path):
    bundle, plan, folder = built
    fam = bundle.family
    batch = 2 if fam.cfg else 1
    check_dit_onnx_engine(folder, fam, plan, "cpu", "fp32", batch)  # serves its own plan
    wider = validate_plan(fam, [Stage(128, 128, 2), Stage(256, 256, 2)])
    with pytest.raises(EngineError, match=r"serves .*128x128 to 192x192.* not this plan.*mf-build-engines --model "
                                          f"{fam.name} --backend onnxruntime"):
        check_dit_onnx_engine(folder, fam, wider, "cpu", "fp32", batch)
    with pytest.raises(ValueError, match="no engine takes the shapes"):  # the runner refuses it too
        opts = FlowGenerationOptions("x", guidance=fam.default_guidance, seed=1)
        FlowMegaFusionPipeline(bundle, onnx_engine_networks(bundle, folder, "cpu", "fp32")).generate(wider, opts)
    other = load_model("tiny-flux" if fam.kind == "sd3" else "tiny-sd3").family
    with pytest.raises(EngineError, match=f"holds no {other.name} transformer engines .*it holds {fam.name} "
                                          "transformer fp32 onnxruntime"):
        choose_dit_engines(folder, other, validate_plan(other, STAGES), "cpu", "fp32", 1, False)
    with pytest.raises(EngineError, match="holds no .* in fp16"):
        choose_dit_engines(folder, fam, plan, "cpu", "fp16", batch, False)
    saved = next(bundle.transformer.parameters()).detach().clone()
    try:
        torch.nn.init.zeros_(next(bundle.transformer.parameters()))
        with pytest.raises(EngineError, match="other weights"):
            onnx_engine_networks(bundle, folder, "cpu", "fp32")
    finally:
        with torch.no_grad():
            next(bundle.transformer.parameters()).copy_(saved)


def _fake_aoti_entries(bundle, plan, folder, batch):
    """aoti entries for the plan's stage shapes as the manifest lists them (a placeholder file: choosing reads the
    manifest only, opening is not tried here)."""
    cache, b = EngineCache(folder), get_backend("aoti")
    for r in dit_requirements(bundle, plan, "fp32", batch):
        key = EngineKey(bundle.family.name, weights_fingerprint(bundle.transformer), r.spec.network, r.spec.variant,
                        r.spec.dilation, "fp32", (r.profile,), b.name, b.version(), device_name("cpu"))
        with cache.staging(key) as tmp:
            (tmp / "model.pt2").write_bytes(b"placeholder")
            cache.commit(key, tmp)


def test_a_folder_with_both_kinds_says_which_runs_and_why(built, tmp_path):
    import shutil

    bundle, plan, folder = built
    fam = bundle.family
    batch = 2 if fam.cfg else 1
    both = tmp_path / "both"
    shutil.copytree(folder, both)
    kind, why = choose_dit_engines(both, fam, plan, "cpu", "fp32", batch, False)
    assert kind.backend == "onnxruntime" and why == ""
    _fake_aoti_entries(bundle, plan, both, batch)
    kind, why = choose_dit_engines(both, fam, plan, "cpu", "fp32", batch, False)
    assert kind.backend == "onnxruntime" and "running onnxruntime: onnxruntime is preferred on cpu" in why
    kind, why = choose_dit_engines(both, fam, plan, "cpu", "fp32", batch, True)  # graphs: a capturable backend
    assert kind.backend == "aoti" and "inside the CUDA graphs" in why
    wider = validate_plan(fam, [Stage(128, 128, 2), Stage(192, 192, 2)])  # in ORT's range, no aoti package
    assert choose_dit_engines(both, fam, wider, "cpu", "fp32", batch, True)[0].backend == "onnxruntime"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_cuda_ep_engine_equals_torch(name, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu's CUDA EP is not installed")
    bundle = load_model(name, device="cuda")
    fam = bundle.family
    plan = validate_plan(fam, [Stage(128, 128, 3), Stage(192, 160, 2)])
    opts = FlowGenerationOptions("a red fox", guidance=fam.default_guidance, seed=2)
    assert build_dit_onnx_engine(bundle, plan, "fp32", tmp_path, 2 if fam.cfg else 1, "cuda") == 1
    want = FlowMegaFusionPipeline(bundle).generate(plan, opts).latent
    nets = onnx_engine_networks(bundle, tmp_path, "cuda", "fp32")
    # fp32 on both sides; the CUDA EP's GEMMs may use TF32 where torch's do not: 1e-3.
    assert _relerr(FlowMegaFusionPipeline(bundle, nets).generate(plan, opts).latent, want) < 1e-3
