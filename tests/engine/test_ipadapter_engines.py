"""IP-Adapter UNet engines (engine/ipadapter_engines.py, export/ipadapter_export.py, core/ipadapter_specs.py).

Reference: the torch path (runtime/ipadapter.py `IPAdapterNetworks`, itself checked against diffusers' IP-Adapter
pipelines in tests/runtime/test_ipadapter.py). Tolerances: a whole plan's latent within tests.engines.LATENT_ATOL,
the image within one level (fp32 CPU, ONNX Runtime), as the ControlNet engine tests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest
import torch

from megafusion.core.families import get_family
from megafusion.core.ipadapter_specs import UNET_IP, ip_unet_spec
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.core.specs import Requirement
from megafusion.engine.build import BuildRequest
from megafusion.engine.cache import EngineCache
from megafusion.engine.controlnet_engines import control_key
from megafusion.engine.fingerprint import ip_adapter_fingerprint, ip_adapter_parts, network_fingerprint
from megafusion.engine.ipadapter_engines import build_ip_engines, open_ip_runners
from megafusion.engine.load import CoverageError, open_engines
from megafusion.engine.networks import TorchNetworks
from megafusion.export.ipadapter_export import IPUNetWrapper, ip_unet
from megafusion.runtime.ipadapter import EngineIPAdapterNetworks, IPAdapterNetworks, read_ip_adapter
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from tests.conftest import IP_SCALE
from tests.engines import LATENT_ATOL, STAGES
from tests.runtime.test_ipadapter import CLIP_DIM, save_ip_adapter, tiny_ip_adapter


def _embeds(seed: int) -> torch.Tensor:
    return torch.randn((1, 1, CLIP_DIM), generator=torch.Generator().manual_seed(seed))


def _torch_ip(bundle, path, scale):
    """A bundle whose UNet is a copy with the IP-Adapter loaded (the session's bundle keeps its own UNet)."""
    return dataclasses.replace(bundle, unet=ip_unet(bundle.unet, read_ip_adapter(path, bundle.unet), scale))


def _engine_nets(bundle, folder, plan, path, scale, embeds):
    base, _ = open_engines(folder, bundle, plan, 2, unopened=frozenset({"unet"}))
    runners = open_ip_runners(folder, bundle, plan, CLIP_DIM, path, scale, base.backend, "fp32", 2, "cpu",
                              base.weights["unet"])
    return EngineIPAdapterNetworks(base, embeds, runners, "cpu")


def _plan(bundle):
    return validate_plan(bundle.family, parse_stages(STAGES))


def test_spec_is_what_the_ip_unet_takes(tiny_sd15, tiny_sdxl):
    for bundle in (tiny_sd15, tiny_sdxl):
        unet = ip_unet(bundle.unet, tiny_ip_adapter(bundle.unet), 0.5)
        spec = ip_unet_spec(bundle.family, CLIP_DIM, dilation=2)
        assert (spec.name, [t.name for t in spec.inputs][-1]) == ("unet_ip-dilated-fp32", "image_embeds")
        axes = spec.axes(2, 16, 24, bundle.family.vae_scale)
        with torch.no_grad():
            eps = IPUNetWrapper(unet, bundle.family.is_xl)(*spec.sample_inputs(axes))
        assert tuple(eps.shape) == spec.outputs[0].concrete(axes)
        assert bundle.unet.config.get("encoder_hid_dim_type") is None  # the session's UNet is left as loaded


def test_keys_hold_the_ip_adapter_and_scale(sd15_ip_ort, tiny_sd15, tmp_path):
    folder, path, said = sd15_ip_ort
    assert "ip-adapter: 3 built, 0 up to date" in said and "0 built, 5 up to date" in said  # 2 unet_ip, encoder
    cache = EngineCache(folder)
    mine = [e for e in cache.entries().values() if e.key.network == UNET_IP]
    assert sorted(e.key.dilation for e in mine) == [1, 2]  # standard at stage 1, dilated after
    base = network_fingerprint(tiny_sd15, "unet")
    want = ip_adapter_fingerprint(base, path, IP_SCALE)
    assert {e.key.weights for e in mine} == {want}
    assert ip_adapter_parts(want) == (base, hashlib.sha256(path.read_bytes()).hexdigest(), IP_SCALE)
    other = save_ip_adapter(tiny_ip_adapter(tiny_sd15.unet, seed=9), tmp_path / "other.safetensors")
    e = mine[0]
    for weights in (ip_adapter_fingerprint(base, path, 0.5), ip_adapter_fingerprint(base, other, IP_SCALE)):
        key = dataclasses.replace(e.key, weights=weights)  # another scale or file: another address, no entry
        assert key.digest() != e.digest and cache.lookup(key) is None
    assert cache.lookup(control_key(tiny_sd15, _requirement(e), e.key.backend, e.key.backend_version, e.key.device,
                               want)) is not None


def _requirement(e):
    """The requirement an entry was built for, as build_ip_engines keys it."""
    return Requirement(ip_unet_spec(get_family(e.key.model), CLIP_DIM, e.key.precision, e.key.dilation),
                       e.key.profiles)


def test_plan_on_engines_matches_torch_path(sd15_ip_ort, tiny_sd15):
    folder, path, _ = sd15_ip_ort
    plan, embeds = _plan(tiny_sd15), _embeds(1)
    opts = GenerationOptions("a teapot", seed=1)
    got = MegaFusionPipeline(tiny_sd15, _engine_nets(tiny_sd15, folder, plan, path, IP_SCALE, embeds),
                             "cpu").generate(plan, opts)
    ip_bundle = _torch_ip(tiny_sd15, path, IP_SCALE)
    ref = MegaFusionPipeline(ip_bundle, IPAdapterNetworks(TorchNetworks(ip_bundle), embeds), "cpu").generate(plan,
                                                                                                           opts)
    plain = MegaFusionPipeline(tiny_sd15, open_engines(folder, tiny_sd15, plan, 2)[0], "cpu").generate(plan, opts)
    assert (got.latent - ref.latent).abs().max() <= LATENT_ATOL
    assert np.abs(got.image.astype(int) - ref.image.astype(int)).max() <= 1
    assert (ref.latent - plain.latent).abs().max() > 10 * LATENT_ATOL  # the IP-Adapter acts
    assert np.abs(got.image.astype(int) - plain.image.astype(int)).max() > 10
    # The buffered step (what the CUDA graphs capture; eager on CPU) gives the same latent.
    fast = MegaFusionPipeline.fast(tiny_sd15, _engine_nets(tiny_sd15, folder, plan, path, IP_SCALE, embeds), "cpu")
    assert (fast.generate(plan, opts).latent - got.latent).abs().max() <= 1e-5


def test_missing_entries_and_other_scale_refused(sd15_ip_ort, tiny_sd15, tmp_path):
    folder, path, _ = sd15_ip_ort
    plan = _plan(tiny_sd15)
    other = save_ip_adapter(tiny_ip_adapter(tiny_sd15.unet, seed=4), tmp_path / "other.safetensors")
    with pytest.raises(CoverageError, match=r"no unet_ip \(standard, fp32\) of --ip-adapter .*other.safetensors at "
                                            r"128x128; build them with: mf-build-engines .* --ip-adapter "
                                            r".*other.safetensors --ip-adapter-scale 0.7$"):
        open_ip_runners(folder, tiny_sd15, plan, CLIP_DIM, other, IP_SCALE, "onnxruntime", "fp32", 2)
    with pytest.raises(CoverageError, match=r"built with --ip-adapter-scale 0.7, not 0.5: run with "
                                            r"--ip-adapter-scale 0.7, or build this scale with: .*-scale 0.5$"):
        open_ip_runners(folder, tiny_sd15, plan, CLIP_DIM, path, 0.5, "onnxruntime", "fp32", 2)
    with pytest.raises(CoverageError, match="runs on aoti or onnxruntime engines"):
        open_ip_runners(folder, tiny_sd15, plan, CLIP_DIM, path, IP_SCALE, "tensorrt", "fp16", 2)


def test_build_refuses_other_backends_and_dynamic(tiny_sd15, tmp_path):
    plan, state = _plan(tiny_sd15), tiny_ip_adapter(tiny_sd15.unet)
    with pytest.raises(ValueError, match="built for aoti and onnxruntime, not torch"):
        build_ip_engines(tiny_sd15, state, tmp_path / "x", 1.0, BuildRequest(plan, "torch", "fp32", tmp_path))
    with pytest.raises(ValueError, match="leave out --dynamic"):
        build_ip_engines(tiny_sd15, state, tmp_path / "x", 1.0,
                         BuildRequest(plan, "aoti", "fp32", tmp_path, dynamic=True))


@pytest.mark.slow
def test_sdxl_plan_on_engines_matches_torch_path(tiny_sdxl, sdxl_engines, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(sdxl_engines, out)
    path = save_ip_adapter(tiny_ip_adapter(tiny_sdxl.unet, seed=5), tmp_path / "ip.safetensors")
    plan, embeds = _plan(tiny_sdxl), _embeds(2)
    state = read_ip_adapter(path, tiny_sdxl.unet)
    said: list[str] = []
    report = build_ip_engines(tiny_sdxl, state, path, 0.6, BuildRequest(plan, "onnxruntime", "fp32", out,
                                                                         ort_optimize="cpu"), log=said.append)
    # ORT's attention fusion does not take the IP attention: exported unfused, and the key says so.
    assert [e.key.ort_optimize for e, _ in report.built] == ["none", "none"]
    assert "unet_ip is exported unfused (--ort-optimize cpu" in said[0]
    opts = GenerationOptions("a teapot", seed=2)
    got = MegaFusionPipeline(tiny_sdxl, _engine_nets(tiny_sdxl, out, plan, path, 0.6, embeds),
                             "cpu").generate(plan, opts)
    ip_bundle = _torch_ip(tiny_sdxl, path, 0.6)
    ref = MegaFusionPipeline(ip_bundle, IPAdapterNetworks(TorchNetworks(ip_bundle), embeds), "cpu").generate(plan,
                                                                                                           opts)
    assert (got.latent - ref.latent).abs().max() <= LATENT_ATOL
    assert np.abs(got.image.astype(int) - ref.image.astype(int)).max() <= 1
    plain = MegaFusionPipeline(tiny_sdxl, open_engines(out, tiny_sdxl, plan, 2)[0], "cpu").generate(plan, opts)
    assert (ref.latent - plain.latent).abs().max() > 10 * LATENT_ATOL


@pytest.mark.gpu
def test_aoti_ip_engines_captured_in_the_step_graph_on_cuda(tmp_path, no_tf32):
    """On CUDA, static aoti packages of the plan with unet_ip (built as mf-build-engines builds them, from its own
    fp32 CPU load): the graphed loop captures one step graph per stage shape (2, replayed on the next run) and gives
    the eager engine loop's latent; that one is within the engine tolerance of the torch IP path on CUDA, run on
    the same weights moved there (fp32, TF32 off: the package's convolutions and the module's may take other cuDNN
    algorithms)."""
    from megafusion.cli.build_engines import main as build_main
    from megafusion.core.loading import load_model, to_device

    bundle = load_model("tiny-sd15")  # fp32 on the CPU: what the build hashed, as mf-generate --engines loads it
    path = save_ip_adapter(tiny_ip_adapter(bundle.unet, seed=8), tmp_path / "ip.safetensors")
    out = tmp_path / "engines"
    assert build_main(["--model", "tiny-sd15", "--stages", STAGES, "--backend", "aoti", "--device", "cuda",
                       "--ip-adapter", str(path), "--ip-adapter-scale", "0.8", "--output", str(out)]) == 0
    plan, embeds, opts = _plan(bundle), _embeds(3), GenerationOptions("a teapot", seed=3)

    def nets():
        base, _ = open_engines(out, bundle, plan, 2, device="cuda", unopened=frozenset({"unet"}))
        runners = open_ip_runners(out, bundle, plan, CLIP_DIM, path, 0.8, "aoti", "fp32", 2, "cuda",
                                  base.weights["unet"])
        return EngineIPAdapterNetworks(base, embeds, runners, "cuda")

    eager = MegaFusionPipeline(bundle, nets(), "cuda")
    fast_nets = nets()
    assert fast_nets.capturable
    fast = MegaFusionPipeline.fast(bundle, fast_nets, "cuda")
    x = eager.generate(plan, opts).latent
    y = fast.generate(plan, opts).latent
    assert fast.graphs.captures == 2
    rel = float((y - x).norm() / x.norm())
    assert rel < 1e-3, rel
    again = float(fast.generate(plan, opts).latent.sub(y).abs().max())
    assert again < 1e-5 and fast.graphs.captures == 2, (again, fast.graphs.captures)
    # The engines' weights, moved: a model initialised on CUDA has other random weights than a CPU one
    gpu = to_device(load_model("tiny-sd15"), torch.device("cuda"), torch.float32)
    ip_bundle = dataclasses.replace(gpu, unet=ip_unet(gpu.unet, read_ip_adapter(path, gpu.unet), 0.8))
    ref = MegaFusionPipeline(ip_bundle, IPAdapterNetworks(TorchNetworks(ip_bundle), embeds.cuda()),
                             "cuda").generate(plan, opts).latent
    gap = float((x.cpu() - ref.cpu()).abs().max())
    assert gap <= LATENT_ATOL, gap


@pytest.mark.slow
def test_aoti_package_matches_torch(tiny_sd15, tmp_path):
    """One static AOTInductor package (the standard unet_ip of a one-stage plan: one compile, about half a minute on
    2 cores): within 1e-4 relative of the torch IP UNet at batch 2 (CFG) and 1, through the same opener as a run."""
    path = save_ip_adapter(tiny_ip_adapter(tiny_sd15.unet, seed=7), tmp_path / "ip.safetensors")
    state = read_ip_adapter(path, tiny_sd15.unet)
    plan = validate_plan(tiny_sd15.family, parse_stages("128x128:1"))
    report = build_ip_engines(tiny_sd15, state, path, 0.9, BuildRequest(plan, "aoti", "fp32", tmp_path / "e"))
    assert [e.key.backend for e, _ in report.built] == ["aoti"]
    runner = open_ip_runners(tmp_path / "e", tiny_sd15, plan, CLIP_DIM, path, 0.9, "aoti", "fp32", 2)[1]
    unet = IPUNetWrapper(ip_unet(tiny_sd15.unet, state, 0.9), False)
    plain = IPUNetWrapper(ip_unet(tiny_sd15.unet, state, 0.0), False)
    for batch in (2, 1):
        x = runner.spec.sample_inputs(runner.spec.axes(batch, 16, 16, 8), seed=batch)
        got = runner.run({t.name: v.contiguous() for t, v in zip(runner.spec.inputs, x)})["eps"]
        with torch.no_grad():
            ref, off = unet(*x), plain(*x)
        assert float((got - ref).norm() / ref.norm()) < 1e-4
        assert float((off - ref).norm() / ref.norm()) > 1e-3  # the image attention acts at this scale
