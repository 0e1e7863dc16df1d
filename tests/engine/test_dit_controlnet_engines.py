"""ControlNet engines of SD3 and FLUX (engine/dit_controlnet_engines.py, export/dit_controlnet_aoti.py,
runtime/flow_controlnet_engines.py, cli/flow_controlnet_engines.py).

Reference: the torch path (runtime/flow_controlnet.py `ControlledFlowNetworks`, itself checked against diffusers'
ControlNet pipelines in tests/runtime/test_flow_controlnet.py). Tolerances (float32, CPU): one package call within
1e-4 relative of its module; a 2-stage plan's latent from the packages within 1e-3 of the torch path's (Inductor's
kernels over 4 steps and a relay); the same wrappers run eagerly as the runners within 1e-5 (same ops, other
summation order at most); PNGs within 1 level. The compiled tests share one build per family (module fixtures).
"""
from __future__ import annotations

import shutil

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.core.controlnet_specs import CONTROLNET
from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.cache import EngineCache, EngineError
from megafusion.engine.dit_controlnet_engines import (build_dit_controlnet_engines, dit_control_requirements,
                                                      open_dit_controlnet_engines)
from megafusion.engine.dit_engines import dit_engine_kinds
from megafusion.engine.flow_networks import FlowTorchNetworks, image_ids
from megafusion.export.dit_controlnet_aoti import (CONTROLLED_TRANSFORMER, REPEAT_VARIANT, control_axes,
                                                   control_layout, control_wrapper, controlled_dit_spec,
                                                   controlnet_dit_spec)
from megafusion.export.dit_flux_export import rotary_given
from megafusion.runtime.controlnet import Control
from megafusion.runtime.flow_controlnet import ControlledFlowNetworks
from megafusion.runtime.flow_controlnet_engines import EngineControlledFlowNetworks
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline
from tests.runtime.test_flow_controlnet import control_image, save_tiny_flow_controlnet, tiny_flow_controlnet

PROMPT = "a bridge over a river"


def _relerr(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _opts(family, seed=3):
    return FlowGenerationOptions(PROMPT, guidance=family.default_guidance, seed=seed, relay="latent")


def _batch(family) -> int:
    return 2 if family.cfg and family.default_guidance > 1 else 1


class EagerRunner:
    """A runner over the export's own wrapper, run eagerly: what a package computes, without the compile."""

    capturable = True

    def __init__(self, module, family, spec, layout=None):
        self.module, self.family, self.spec, self.layout = module, family, spec, layout

    def run(self, inputs):
        with contextlib.ExitStack() as stack:
            given = stack.enter_context(rotary_given(self.module)) if self.family.kind == "flux" else None
            wrapper = control_wrapper(self.module, self.family, self.spec, self.layout, given)
            out = wrapper(*(inputs[t.name] for t in self.spec.inputs))
        outs = (out,) if isinstance(out, torch.Tensor) else out
        return {t.name: y for t, y in zip(self.spec.outputs, outs)}


def _eager_nets(bundle, controls):
    fam = bundle.family
    layout = control_layout([c.model for c in controls])
    nets = [EagerRunner(c.model, fam, controlnet_dit_spec(fam, c.model, "fp32")) for c in controls]
    controlled = controlled_dit_spec(fam, layout, "fp32", fam.kind == "flux")
    return EngineControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cpu", nets,
                                        EagerRunner(bundle.transformer, fam, controlled, layout))


def _torch_nets(bundle, controls):
    return ControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cpu")


# --- specs and the runtime's step, without compiling ---------------------------------------------------------------

@pytest.mark.parametrize("name,xlabs", [("tiny-sd3", False), ("tiny-flux", False), ("tiny-flux", True)])
def test_specs_list_every_block_sample(name, xlabs):
    bundle = load_model(name)
    fam = bundle.family
    cn = tiny_flow_controlnet(fam, 1, xlabs)
    spec = controlnet_dit_spec(fam, cn, "bf16")
    assert [t.name for t in spec.inputs][-2:] == ["controlnet_cond", "conditioning_scale"]
    assert spec.network == CONTROLNET and spec.outputs[0].dtype == "bfloat16"
    axes = control_axes(fam, 1, 16, 24)
    x = {t.name: torch.randn(t.concrete(axes)) for t in controlnet_dit_spec(fam, cn, "fp32").inputs}
    if fam.kind == "flux":
        ids = torch.cat([torch.zeros(fam.t5_max_length, 3), image_ids(16, 24, "cpu", torch.float32)])
        x["rotary_cos"], x["rotary_sin"] = cn.pos_embed(ids)
    runner = EagerRunner(cn, fam, controlnet_dit_spec(fam, cn, "fp32"))
    with torch.no_grad():
        out = runner.run(x)
    assert [tuple(y.shape) for y in out.values()] == [t.concrete(axes) for t in spec.outputs]
    layout = control_layout([cn])
    controlled = controlled_dit_spec(fam, layout, "fp32")
    assert [t.name for t in controlled.inputs][-len(spec.outputs):] == [t.name for t in spec.outputs]
    assert controlled.network == CONTROLLED_TRANSFORMER
    assert (controlled.variant == REPEAT_VARIANT) == xlabs


def test_layout_sums_over_the_shorter_list():
    flux = load_model("tiny-flux").family
    one, two = tiny_flow_controlnet(flux, 1), tiny_flow_controlnet(flux, 2)
    assert control_layout([one]).names() == ("block_0", "single_0")
    two.controlnet_single_blocks = torch.nn.ModuleList()  # no single-block samples: the running sum stays
    assert control_layout([one, two]).names() == ("block_0", "single_0")
    assert control_layout([two, one]).names() == ("block_0",)  # a first net without them: none, as in diffusers


@pytest.mark.parametrize("name,xlabs", [("tiny-sd3", False), ("tiny-flux", False), ("tiny-flux", True)])
def test_engine_step_with_eager_runners_equals_the_torch_path(name, xlabs):
    """The runtime's engine step (inputs by spec, samples summed, the controlled transformer) on runners that run
    the packages' wrappers eagerly: two ControlNets (windows, scales), a 2-stage plan, eager and graphs modes."""
    bundle = load_model(name)
    fam = bundle.family
    image = control_image(96, 80, 2)
    nets = [tiny_flow_controlnet(fam, s, xlabs).eval() for s in (1, 2)]
    controls = [Control(nets[0], image, 0.9, 0.0, 0.8), Control(nets[1], image, 0.6, 0.4, 1.0)]
    plan = validate_plan(fam, [Stage(128, 128, 2), Stage(160, 128, 2)])
    ref = FlowMegaFusionPipeline(bundle, _torch_nets(bundle, controls), "cpu").generate(plan, _opts(fam)).latent
    assert _relerr(FlowMegaFusionPipeline(bundle).generate(plan, _opts(fam)).latent, ref) > 1e-3
    for mode in ("eager", "graphs"):
        ours = FlowMegaFusionPipeline(bundle, _eager_nets(bundle, controls), "cpu", mode).generate(plan, _opts(fam))
        assert _relerr(ours.latent, ref) < 1e-5


def test_onnxruntime_kind_declares_no_controlnet(tmp_path, capsys):
    from megafusion.cli.build_engines import main as build

    kinds = dit_engine_kinds()
    assert kinds["aoti"].takes_controlnet and not kinds["onnxruntime"].takes_controlnet
    save_tiny_flow_controlnet(load_model("tiny-sd3").family, tmp_path / "cn")
    rc = build(["--model", "tiny-sd3", "--backend", "onnxruntime", "--controlnet", str(tmp_path / "cn"),
                "--output", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "--controlnet: onnxruntime tiny-sd3 engines take no ControlNet" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


def test_onnxruntime_engines_refuse_controlnet_at_generate(tmp_path, capsys):
    """A folder of ONNX Runtime transformer engines only: one line naming the backend and the aoti build, before
    the model load."""
    from megafusion.cli.build_engines import main as build
    from megafusion.cli.generate import main as generate

    plan = ["--stages", "128x128:2,128x128:2"]
    assert build(["--model", "tiny-sd3", "--backend", "onnxruntime", *plan, "--output", str(tmp_path / "e")]) == 0
    cn = save_tiny_flow_controlnet(load_model("tiny-sd3").family, tmp_path / "cn")
    Image.new("RGB", (64, 64)).save(tmp_path / "c.png")
    capsys.readouterr()
    rc = generate(["--model", "tiny-sd3", *plan, "--engines", str(tmp_path / "e"), "--controlnet", str(cn),
                   "--control-image", str(tmp_path / "c.png"), "--prompt", "x", "--output", str(tmp_path / "x.png"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    assert "--controlnet with --engines: onnxruntime transformer engines take no ControlNet" in err
    assert "--backend aoti" in err and f"--controlnet {cn}" in err


def test_controlnet_of_the_other_family_is_refused_before_the_build(tmp_path, capsys):
    from megafusion.cli.build_engines import main as build

    save_tiny_flow_controlnet(load_model("tiny-sd3").family, tmp_path / "cn")
    rc = build(["--model", "tiny-flux", "--backend", "aoti", "--controlnet", str(tmp_path / "cn"),
                "--output", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "takes a FluxControlNetModel" in err and len(err.strip().splitlines()) == 1


# --- compiled packages (one build per family) ----------------------------------------------------------------------

SD3_PLAN = [Stage(128, 128, 2), Stage(160, 128, 2)]


@pytest.fixture(scope="module")
def sd3_built(tmp_path_factory):
    """tiny-sd3, one ControlNet, its packages and the controlled transformer's for a 2-shape plan (engine API)."""
    bundle = load_model("tiny-sd3")
    root = tmp_path_factory.mktemp("sd3-cn")
    cn = tiny_flow_controlnet(bundle.family, 1).eval()
    plan = validate_plan(bundle.family, SD3_PLAN)
    built = build_dit_controlnet_engines(bundle, plan, [cn], "fp32", root / "eng", _batch(bundle.family))
    return bundle, cn, plan, root / "eng", built


@pytest.fixture(scope="module")
def flux_built(tmp_path_factory, flux_aoti):
    """tiny-flux through mf-build-engines --controlnet (one stage shape, two stages): (folder, ControlNet folder).
    Starts from a copy of the session's folder (tests/conftest.py flux_aoti), whose plain 128x128 transformer
    package the build keeps: only the ControlNet's and the controlled transformer's compile here."""
    from megafusion.cli.build_engines import main as build

    root = tmp_path_factory.mktemp("flux-cn")
    shutil.copytree(flux_aoti[0], root / "eng")
    save_tiny_flow_controlnet(load_model("tiny-flux").family, root / "cn", seed=1)
    assert build(["--model", "tiny-flux", "--backend", "aoti", "--stages", "128x128:2,128x128:2", "--device", "cpu",
                  "--networks", "transformer", "--controlnet", str(root / "cn"), "--output", str(root / "eng")]) == 0
    Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype(np.uint8)).save(root / "ctl.png")
    return root


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_a_controlnet_folder_gives_its_loaded_fingerprint(name, tmp_path):
    """What mf-serve and mf-generate check before any load (`folder_weights`) is the key the loaded ControlNet's
    packages get; an SD3.5 ControlNet that takes the transformer's patch embedding has only its tensors to say."""
    from diffusers import SD3ControlNetModel

    from megafusion.engine.dit_controlnet_engines import folder_weights
    from megafusion.engine.fingerprint import WEIGHTS_SCHEME, loaded_fingerprint, module_fingerprint
    from megafusion.runtime.flow_controlnet import load_flow_controlnet

    bundle = load_model(name)
    fam = bundle.family
    path = save_tiny_flow_controlnet(fam, tmp_path / "cn", seed=3)
    fp = folder_weights(fam, path)
    assert fp.startswith(f"mf{WEIGHTS_SCHEME}:files:")
    assert loaded_fingerprint(load_flow_controlnet(path, bundle.transformer, fam, "cpu", torch.float32)) == fp
    if fam.kind == "sd3":
        SD3ControlNetModel(**{**fam.transformer, "num_layers": 1, "use_pos_embed": False}).save_pretrained(
            str(tmp_path / "shared"))
        assert folder_weights(fam, tmp_path / "shared") is None
        cn = load_flow_controlnet(tmp_path / "shared", bundle.transformer, fam, "cpu", torch.float32)
        assert loaded_fingerprint(cn) == module_fingerprint(cn)


@pytest.mark.slow
def test_sd3_packages_equal_their_modules_and_the_torch_path(sd3_built):
    bundle, cn, plan, folder, built = sd3_built
    fam = bundle.family
    assert built == 4  # per stage shape: the ControlNet and the controlled transformer
    assert build_dit_controlnet_engines(bundle, plan, [cn], "fp32", folder, _batch(fam)) == 0  # kept
    entries = EngineCache(folder).entries().values()
    assert {e.key.weights for e in entries if e.key.network == CONTROLNET} == {dit_control_requirements(
        bundle, plan, [cn], "fp32", 2)[0].weights}
    nets, controlled = open_dit_controlnet_engines(folder, bundle, plan, [cn], ["cn"], "cpu", "fp32", _batch(fam))
    for r in dit_control_requirements(bundle, plan, [cn], "fp32", _batch(fam)):
        axes = control_axes(fam, r.batch, r.latent_h, r.latent_w)
        g = torch.Generator().manual_seed(1)
        x = {t.name: torch.randn(t.concrete(axes), generator=g) for t in r.spec.inputs}
        x["timestep"] = torch.full(x["timestep"].shape, 700.0)
        runner = nets[0] if r.index == 0 else controlled
        layout = control_layout([cn])
        with torch.no_grad():
            want = EagerRunner(r.module, fam, r.spec, layout).run(x)
        got = runner.run(x)
        for k in want:
            assert _relerr(got[k], want[k]) < 1e-4, (r.spec.network, k)
    controls = [Control(cn, control_image(96, 80, 2), 0.8, 0.0, 0.75)]
    ref = FlowMegaFusionPipeline(bundle, _torch_nets(bundle, controls), "cpu").generate(plan, _opts(fam)).latent
    for mode in ("eager", "graphs"):
        engine = EngineControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cpu", nets, controlled)
        ours = FlowMegaFusionPipeline(bundle, engine, "cpu", mode).generate(plan, _opts(fam)).latent
        assert _relerr(ours, ref) < 1e-3
    other = tiny_flow_controlnet(fam, 7).eval()  # another ControlNet's weights: its own key, not built here
    with pytest.raises(EngineError, match=r"other weights.*mf-build-engines --model tiny-sd3 .*--controlnet other"):
        open_dit_controlnet_engines(folder, bundle, plan, [other], ["other"], "cpu", "fp32", _batch(fam))


@pytest.mark.slow
def test_flux_build_then_generate_through_the_clis(flux_built, capsys):
    from megafusion.cli.generate import main as generate

    root = flux_built
    # the session's folder it started from (transformer at 128 and 160, text encoders, VAE) plus the two built here
    entries = [e.key.network for e in EngineCache(root / "eng").entries().values()]
    assert entries.count(CONTROLNET) == entries.count(CONTROLLED_TRANSFORMER) == 1 and "transformer" in entries
    common = ["--model", "tiny-flux", "--stages", "128x128:2,128x128:2", "--prompt", PROMPT, "--controlnet",
              str(root / "cn"), "--control-image", str(root / "ctl.png"), "--control-scale", "0.8", "--no-progress"]
    assert generate([*common, "--output", str(root / "torch.png")]) == 0
    assert generate([*common, "--engines", str(root / "eng"), "--output", str(root / "eng.png")]) == 0
    assert "controlnet: 1 from the aoti packages" in capsys.readouterr().out
    a, b = (np.asarray(Image.open(root / n)).astype(int) for n in ("torch.png", "eng.png"))
    assert a.std() > 0 and np.abs(a - b).max() <= 1
    plain = ["--model", "tiny-flux", "--stages", "128x128:2,128x128:2", "--prompt", PROMPT, "--no-progress"]
    assert generate([*plain, "--output", str(root / "plain.png")]) == 0
    assert np.abs(np.asarray(Image.open(root / "plain.png")).astype(int) - a).max() > 1  # the ControlNet acts


@pytest.mark.slow
def test_missing_package_is_one_line_with_the_build_command(flux_built, capsys):
    from megafusion.cli.generate import main as generate

    root = flux_built
    rc = generate(["--model", "tiny-flux", "--stages", "128x128:2,192x192:2", "--prompt", "x", "--controlnet",
                   str(root / "cn"), "--control-image", str(root / "ctl.png"), "--engines", str(root / "eng"),
                   "--output", str(root / "x.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not (root / "x.png").exists()
    assert "no tiny-flux controlled-transformer package for the 192x192 stage" in err
    assert (f"mf-build-engines --model tiny-flux --stages 128x128:2,192x192:2 --backend aoti --precision fp32 "
            f"--device cpu --output {root / 'eng'} --controlnet {root / 'cn'}") in err
    # another ControlNet of the same architecture: its folder's fingerprint keys no package, refused before the load
    other = save_tiny_flow_controlnet(load_model("tiny-flux").family, root / "other", seed=5)
    rc = generate(["--model", "tiny-flux", "--stages", "128x128:2,128x128:2", "--prompt", "x", "--controlnet",
                   str(other), "--control-image", str(root / "ctl.png"), "--engines", str(root / "eng"),
                   "--output", str(root / "x.png"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not (root / "x.png").exists()
    assert f"no tiny-flux ControlNet package of --controlnet {other} for the 128x128 stage" in err


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_cuda_graphs_hold_the_controlnet_packages(name, tmp_path):
    """Graphs mode: one capture per stage descriptor holding the ControlNet and controlled-transformer packages,
    replayed for every step; the latent within 1e-3 of the torch path's (fp32: Inductor's kernels against
    cuBLAS/SDPA)."""
    bundle = load_model(name, device="cuda", dtype=torch.float32)
    fam = bundle.family
    cn = tiny_flow_controlnet(fam, 1).to("cuda").eval()
    plan = validate_plan(fam, [Stage(128, 128, 3), Stage(192, 160, 2)])
    assert build_dit_controlnet_engines(bundle, plan, [cn], "fp32", tmp_path, _batch(fam), "cuda") == 4
    controls = [Control(cn, control_image(128, 128).cuda(), 0.9, 0.0, 0.8)]
    ref = FlowMegaFusionPipeline(bundle, ControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cuda"),
                                 "cuda").generate(plan, _opts(fam)).latent
    nets, controlled = open_dit_controlnet_engines(tmp_path, bundle, plan, [cn], ["cn"], "cuda", "fp32", _batch(fam))
    engine = EngineControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cuda", nets, controlled)
    pipe = FlowMegaFusionPipeline(bundle, engine, "cuda", "graphs")
    first = pipe.generate(plan, _opts(fam)).latent
    assert pipe.graphs.captures == 2 and pipe.graphs.replays == plan.total_steps
    assert _relerr(first, ref) < 1e-3
    second = pipe.generate(plan, _opts(fam)).latent
    assert pipe.graphs.captures == 2 and pipe.graphs.replays == 2 * plan.total_steps
    assert _relerr(second, ref) < 1e-3
