"""ControlNet engines (engine/controlnet_engines.py, export/controlnet_export.py, core/controlnet_specs.py).

Reference: the torch path (runtime/controlnet.py `ControlledNetworks`, itself checked against diffusers' ControlNet
pipelines in tests/runtime/test_controlnet.py). Tolerances: one network call within 1e-4 relative; a whole plan's
latent within tests.engines.LATENT_ATOL (fp32 CPU, ONNX Runtime).
"""
from __future__ import annotations

import shutil

import pytest
import torch

from megafusion.core.controlnet_specs import CONTROLNET, UNET_CONTROLLED, controlnet_spec, residual_layout
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine.build import BuildRequest
from megafusion.engine.cache import EngineCache
from megafusion.engine.fingerprint import WEIGHTS_SCHEME, folder_fingerprint, loaded_fingerprint, network_fingerprint
from megafusion.engine.controlnet_engines import build_controlnet_engines, open_controlnet_runners
from megafusion.engine.load import CoverageError, open_engines
from megafusion.engine.networks import TorchNetworks
from megafusion.runtime.controlnet import Control, ControlledNetworks, EngineControlledNetworks, load_controlnet
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline
from tests.conftest import AOTI_STAGES
from tests.engines import LATENT_ATOL, STAGES
from tests.runtime.test_controlnet import control_image, save_tiny_controlnet


def _relerr(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _controlnet(bundle, path, seed):
    return load_controlnet(save_tiny_controlnet(bundle.unet, path, seed), bundle.unet, "cpu", torch.float32)


@pytest.fixture(scope="module")
def sd15_controlled(tiny_sd15, sd15_engines, tmp_path_factory):
    """The plain tiny-sd15 engines plus two ControlNets' ORT engines: (folder, plan, [(path, controlnet)])."""
    out = tmp_path_factory.mktemp("cn-engines") / "engines"
    shutil.copytree(sd15_engines, out)
    root = tmp_path_factory.mktemp("cn-models")
    cns = [(str(root / n), _controlnet(tiny_sd15, root / n, s)) for n, s in (("a", 1), ("b", 2))]
    plan = validate_plan(tiny_sd15.family, parse_stages(STAGES))
    build_controlnet_engines(tiny_sd15, [c for _, c in cns], BuildRequest(plan, "onnxruntime", "fp32", out))
    return out, plan, cns


def _engine_nets(bundle, folder, plan, cns, controls, device="cpu"):
    base, _ = open_engines(folder, bundle, plan, 2, device=device)
    nets, unets = open_controlnet_runners(folder, bundle, plan, [c for _, c in cns], [p for p, _ in cns],
                                          base.backend, "fp32", 2, device)
    return EngineControlledNetworks(base, bundle, controls, device, nets, unets)


def test_spec_lists_every_residual_of_the_controlnet(tiny_sd15, tiny_sdxl, tmp_path):
    for bundle in (tiny_sd15, tiny_sdxl):
        cn = _controlnet(bundle, tmp_path / bundle.family.name, 0)
        spec = controlnet_spec(bundle.family, cn.config)
        assert [t.name for t in spec.inputs][-2:] == ["controlnet_cond", "conditioning_scale"]
        axes = spec.axes(2, 16, 24, bundle.family.vae_scale)
        x = spec.sample_inputs(axes)
        added = {"text_embeds": x[3], "time_ids": x[4]} if bundle.family.is_xl else None
        down, mid = cn(x[0], x[1], encoder_hidden_states=x[2], controlnet_cond=x[-2], conditioning_scale=x[-1],
                       added_cond_kwargs=added, return_dict=False)
        assert [tuple(t.shape) for t in (*down, mid)] == [t.concrete(axes) for t in spec.outputs]
        assert len(residual_layout(cn.config)) == len(spec.outputs)


def test_keys_hold_each_controlnets_fingerprint(sd15_controlled, tiny_sd15):
    folder, _, cns = sd15_controlled
    entries = EngineCache(folder).entries().values()
    for path, cn in cns:
        fp = folder_fingerprint(path)  # its folder's files, known without loading it (mf-serve's check)
        assert fp == loaded_fingerprint(cn) and fp.startswith(f"mf{WEIGHTS_SCHEME}:files:")
        mine = [e for e in entries if e.key.network == CONTROLNET and e.key.weights == fp]
        assert sorted(e.key.dilation for e in mine) == [1, 2]  # standard at stage 1, dilated after
    controlled = [e for e in entries if e.key.network == UNET_CONTROLLED]
    assert {e.key.weights for e in controlled} == {network_fingerprint(tiny_sd15, "unet")}  # the plain UNet's key
    assert len(controlled) == 2  # one per dilation, shared by both ControlNets


def test_controlnet_engine_matches_torch(sd15_controlled, tiny_sd15):
    folder, plan, cns = sd15_controlled
    nets, _ = open_controlnet_runners(folder, tiny_sd15, plan, [c for _, c in cns], [p for p, _ in cns],
                                      "onnxruntime", "fp32", 2)
    cn = cns[0][1]
    spec = nets[2][0].spec
    x = spec.sample_inputs(spec.axes(2, 32, 32, 8), seed=3)  # stage 2's shape, the dilated engine
    x = (*x[:-1], torch.tensor([0.7]))
    got = nets[2][0].run({t.name: v for t, v in zip(spec.inputs, x)})
    from megafusion.core.dilation import mid_dilation

    with torch.no_grad(), mid_dilation(cn, 2):
        down, mid = cn(x[0], x[1], encoder_hidden_states=x[2], controlnet_cond=x[3], conditioning_scale=0.7,
                       return_dict=False)
    for t, ref in zip(spec.outputs, (*down, mid)):
        assert _relerr(got[t.name], ref) < 1e-4, t.name
    assert mid.abs().max() > 1e-3  # a real residual, not zeros compared with zeros


def test_plan_on_engines_matches_torch_path_two_controlnets(sd15_controlled, tiny_sd15):
    folder, plan, cns = sd15_controlled
    controls = [Control(cns[0][1], control_image(100, 90, 1), 0.8),
                Control(cns[1][1], control_image(64, 64, 2), 0.5, 0.0, 0.5)]
    opts = GenerationOptions("a bridge", seed=1)
    nets = _engine_nets(tiny_sd15, folder, plan, cns, controls)
    got = MegaFusionPipeline(tiny_sd15, nets, "cpu").generate(plan, opts).latent
    ref = MegaFusionPipeline(tiny_sd15, ControlledNetworks(TorchNetworks(tiny_sd15), controls, "cpu"),
                             "cpu").generate(plan, opts).latent
    plain = MegaFusionPipeline(tiny_sd15).generate(plan, opts).latent
    assert (got - ref).abs().max() <= LATENT_ATOL
    assert (ref - plain).abs().max() > 10 * LATENT_ATOL  # the ControlNets act
    # The buffered step (what the CUDA graphs capture; eager on CPU) gives the same latent.
    fast = MegaFusionPipeline.fast(tiny_sd15, _engine_nets(tiny_sd15, folder, plan, cns, controls), "cpu")
    assert (fast.generate(plan, opts).latent - got).abs().max() <= 1e-5


def test_missing_controlnet_entry_refused_with_rebuild_command(sd15_controlled, tiny_sd15, tmp_path):
    folder, plan, cns = sd15_controlled
    other = str(tmp_path / "c")
    c = _controlnet(tiny_sd15, other, 3)
    with pytest.raises(CoverageError, match=r"no controlnet \(standard, fp32\) of --controlnet .*/c at 128x128; "
                                            r"build them with: mf-build-engines .* --controlnet .*/c"):
        open_controlnet_runners(folder, tiny_sd15, plan, [c], [other], "onnxruntime", "fp32", 2)
    with pytest.raises(CoverageError, match="runs on aoti or onnxruntime engines"):
        open_controlnet_runners(folder, tiny_sd15, plan, [c], [other], "tensorrt", "fp16", 2)


def test_build_refuses_other_backends_and_dynamic(tiny_sd15, tmp_path):
    plan = validate_plan(tiny_sd15.family, parse_stages(STAGES))
    with pytest.raises(ValueError, match="built for aoti and onnxruntime, not torch"):
        build_controlnet_engines(tiny_sd15, [], BuildRequest(plan, "torch", "fp32", tmp_path))
    with pytest.raises(ValueError, match="leave out --dynamic"):
        build_controlnet_engines(tiny_sd15, [], BuildRequest(plan, "aoti", "fp32", tmp_path, dynamic=True))


@pytest.mark.slow
def test_sdxl_plan_on_engines_matches_torch_path(tiny_sdxl, sdxl_engines, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(sdxl_engines, out)
    path = str(tmp_path / "cn")
    cn = _controlnet(tiny_sdxl, path, 4)
    plan = validate_plan(tiny_sdxl.family, parse_stages(STAGES))
    build_controlnet_engines(tiny_sdxl, [cn], BuildRequest(plan, "onnxruntime", "fp32", out))
    controls = [Control(cn, control_image(128, 128, 5), 0.9, 0.0, 0.8)]
    opts = GenerationOptions("a bridge", seed=2)
    got = MegaFusionPipeline(tiny_sdxl, _engine_nets(tiny_sdxl, out, plan, [(path, cn)], controls),
                             "cpu").generate(plan, opts).latent
    ref = MegaFusionPipeline(tiny_sdxl, ControlledNetworks(TorchNetworks(tiny_sdxl), controls, "cpu"),
                             "cpu").generate(plan, opts).latent
    assert (got - ref).abs().max() <= LATENT_ATOL
    assert (ref - MegaFusionPipeline(tiny_sdxl).generate(plan, opts).latent).abs().max() > 10 * LATENT_ATOL


@pytest.mark.slow
def test_aoti_packages_match_torch(tiny_sd15, sd15_control_aoti):
    """Static AOTInductor packages of the plan's first stage (a ControlNet and the controlled UNet, standard): each
    within 1e-4 relative of the torch modules, at batch 2 (CFG) and 1. The packages are the session's (tests/conftest.py
    `sd15_control_aoti`, built by mf-build-engines --controlnet, which calls build_controlnet_engines), so the four
    compiles are shared with the C API tests."""
    folder, path = sd15_control_aoti
    cn = load_controlnet(path, tiny_sd15.unet, "cpu", torch.float32)
    plan = validate_plan(tiny_sd15.family, parse_stages(AOTI_STAGES))
    nets, unets = open_controlnet_runners(folder, tiny_sd15, plan, [cn], [str(path)], "aoti", "fp32", 2)
    runner, unet = nets[1][0], unets[1]
    for batch in (2, 1):
        spec = runner.spec
        x = spec.sample_inputs(spec.axes(batch, 16, 16, 8), seed=batch)
        x = (*x[:-1], torch.tensor([0.6]))
        got = runner.run({t.name: v for t, v in zip(spec.inputs, x)})
        with torch.no_grad():
            down, mid = cn(x[0], x[1], encoder_hidden_states=x[2], controlnet_cond=x[3], conditioning_scale=0.6,
                           return_dict=False)
        for t, ref in zip(spec.outputs, (*down, mid)):
            assert _relerr(got[t.name], ref) < 1e-4, t.name
        # Packages read their inputs at the strides they were compiled for (contiguous), as the runtime passes them;
        # the prepared (channels_last) ControlNet package returns channels_last residuals.
        res = {k: v.contiguous() for k, v in got.items()}
        eps = unet.run({"sample": x[0], "timestep": x[1], "encoder_hidden_states": x[2], **res})["eps"]
        ref = TorchNetworks(tiny_sd15).unet(x[0], x[1][0].long(), x[2], None, None, 1, (list(down), mid))
        plain = TorchNetworks(tiny_sd15).unet(x[0], x[1][0].long(), x[2], None, None, 1)
        assert _relerr(eps, ref) < 1e-4
        assert _relerr(plain, ref) > 1e-3  # the residuals act


@pytest.mark.gpu
def test_aoti_controlnet_captured_in_the_step_graph_on_cuda(tmp_path, no_tf32):
    """On CUDA, static aoti packages of the plan, a ControlNet's and the controlled UNet's (built as mf-build-engines
    builds them, from its own fp32 CPU load): the graphed loop captures ControlNet and UNet packages in one step
    graph per stage shape (2 captures, replayed on the next run) and gives the eager engine loop's latent; both are
    within the engine tolerance of the torch path on CUDA, run on the same weights moved there (fp32, TF32 off)."""
    from megafusion.cli.build_engines import main as build_main
    from megafusion.core.loading import load_model, to_device

    bundle = load_model("tiny-sd15")  # fp32 on the CPU: what the build hashed, as mf-generate --engines loads it
    path = save_tiny_controlnet(bundle.unet, tmp_path / "cn", 8)
    out = tmp_path / "engines"
    assert build_main(["--model", "tiny-sd15", "--stages", STAGES, "--backend", "aoti", "--device", "cuda",
                       "--controlnet", str(path), "--output", str(out)]) == 0
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    cn = load_controlnet(path, bundle.unet, "cpu", torch.float32)
    controls = [Control(cn, control_image(128, 128, 3), 0.8, 0.1, 0.9)]
    opts = GenerationOptions("a bridge", seed=3)
    eager = MegaFusionPipeline(bundle, _engine_nets(bundle, out, plan, [(str(path), cn)], controls, "cuda"), "cuda")
    fast_nets = _engine_nets(bundle, out, plan, [(str(path), cn)], controls, "cuda")
    assert fast_nets.capturable
    fast = MegaFusionPipeline.fast(bundle, fast_nets, "cuda")
    x = eager.generate(plan, opts).latent
    y = fast.generate(plan, opts).latent
    assert fast.graphs.captures == 2
    assert _relerr(y, x) < 1e-3
    y2 = fast.generate(plan, opts).latent
    assert fast.graphs.captures == 2 and _relerr(y2, y) < 1e-6
    # The engines' weights, moved: a model initialised on CUDA has other random weights than a CPU one
    gpu = to_device(load_model("tiny-sd15"), torch.device("cuda"), torch.float32)
    ref_controls = [Control(load_controlnet(path, gpu.unet, "cuda", torch.float32), controls[0].image, 0.8, 0.1, 0.9)]
    ref = MegaFusionPipeline(gpu, ControlledNetworks(TorchNetworks(gpu), ref_controls, "cuda"),
                             "cuda").generate(plan, opts).latent
    gap = float((x.cpu() - ref.cpu()).abs().max())
    assert gap <= LATENT_ATOL, gap


@pytest.mark.slow
def test_ort_fused_entries_match_torch_path(tiny_sd15, sd15_engines, tmp_path):
    """--ort-optimize cpu: the ControlNet and controlled UNet fused by ORT's transformer optimizer (attention fused, the
    key says so) give the torch path's latent."""
    out = tmp_path / "engines"
    shutil.copytree(sd15_engines, out)
    path = str(tmp_path / "cn")
    cn = _controlnet(tiny_sd15, path, 9)
    plan = validate_plan(tiny_sd15.family, parse_stages(STAGES))
    report = build_controlnet_engines(tiny_sd15, [cn], BuildRequest(plan, "onnxruntime", "fp32", out,
                                                                    ort_optimize="cpu"))
    assert len(report.built) == 4 and all(e.key.ort_optimize == "cpu" for e, _ in report.built)
    controls = [Control(cn, control_image(128, 128, 6), 0.9)]
    opts = GenerationOptions("a bridge", seed=4)
    got = MegaFusionPipeline(tiny_sd15, _engine_nets(tiny_sd15, out, plan, [(path, cn)], controls),
                             "cpu").generate(plan, opts).latent
    ref = MegaFusionPipeline(tiny_sd15, ControlledNetworks(TorchNetworks(tiny_sd15), controls, "cpu"),
                             "cpu").generate(plan, opts).latent
    assert (got - ref).abs().max() <= LATENT_ATOL


def _count_opened(monkeypatch) -> list[str]:
    """The networks of every entry `open_engines` opens from now on."""
    import megafusion.engine.load as load

    opened: list[str] = []
    real = load.open_entry

    def counting(engine_dir, e, backend, ctx):
        opened.append(e.key.network)
        return real(engine_dir, e, backend, ctx)

    monkeypatch.setattr(load, "open_entry", counting)
    return opened


def test_controlled_run_leaves_the_plain_unet_engines_closed(sd15_controlled, tiny_sd15, monkeypatch):
    """`unopened={"unet"}`: the plain UNet's entries are not opened, the controlled UNet's run every step, and the
    latent is the one with every engine opened (bit for bit: the same engines compute it)."""
    folder, plan, cns = sd15_controlled
    controls = [Control(cns[0][1], control_image(80, 96, 4), 0.7)]
    opts = GenerationOptions("a bridge", seed=5)
    opened = _count_opened(monkeypatch)
    every = _engine_nets(tiny_sd15, folder, plan, cns[:1], controls)
    assert opened.count("unet") == 2  # one dilation-1, one dilation-2 entry: what the plain run opens
    opened.clear()
    base, _ = open_engines(folder, tiny_sd15, plan, 2, unopened=frozenset({"unet"}))
    assert "unet" not in opened and {"text_encoder", "vae_decoder", "vae_encoder"} <= set(opened)
    assert base.weights["unet"] == every.base.weights["unet"]  # the controlled UNet's key, hashed once
    nets, unets = open_controlnet_runners(folder, tiny_sd15, plan, [cns[0][1]], [cns[0][0]], base.backend, "fp32",
                                          2, "cpu", base.weights["unet"])
    closed = EngineControlledNetworks(base, tiny_sd15, controls, "cpu", nets, unets)
    got = MegaFusionPipeline(tiny_sd15, closed, "cpu").generate(plan, opts).latent
    ref = MegaFusionPipeline(tiny_sd15, every, "cpu").generate(plan, opts).latent
    assert torch.equal(got, ref)
    with pytest.raises(RuntimeError, match="left its engines unopened"):  # never called; refuses if it were
        base.unet(torch.zeros(1, 4, 16, 16), torch.tensor(1), torch.zeros(1, 77, 32), None, None, 1)


def test_generate_with_controlnet_engines_opens_no_plain_unet(sd15_controlled, tmp_path, monkeypatch, capsys):
    """mf-generate --engines --controlnet opens the controlled UNet's engines and not the plain UNet's (at SDXL
    size about 10 GB of device memory that the run never calls)."""
    import numpy as np
    from PIL import Image

    from megafusion.cli import generate as gen_cli
    from tests.engines import STAGES as stages

    folder, _, cns = sd15_controlled
    edges = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(edges)
    opened = _count_opened(monkeypatch)
    out = tmp_path / "x.png"
    assert gen_cli.main(["--model", "tiny-sd15", "--stages", stages, "--device", "cpu", "--prompt", "a kite",
                         "--no-progress", "--engines", str(folder), "--controlnet", cns[0][0], "--control-image",
                         str(edges), "--output", str(out)]) == 0, capsys.readouterr().err
    assert out.is_file() and "unet" not in opened and "vae_decoder" in opened
