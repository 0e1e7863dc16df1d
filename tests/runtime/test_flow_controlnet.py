"""ControlNet for SD3 and FLUX through the relay (runtime/flow_controlnet.py, docs/ALGORITHM.md §18).

Reference: diffusers' StableDiffusion3ControlNetPipeline / FluxControlNetPipeline, loaded with `from_pretrained`
from the saved tiny model folder and a saved tiny ControlNet (random weights, its zero-initialized output
projections and input embedding given random values so that its block samples are not zero); megafusion loads
the same folders through its own loaders. The pipelines VAE-encode the control image with a *sampled* posterior
(SD3 from the global RNG, FLUX from the generator); megafusion takes the posterior mean, so the reference runs with
the sample patched to the mean. Tolerance: 1e-5 relative on the final latent (float32 CPU; the sigmas are rounded
from float64 here, computed in float32 there, as in test_flow_reference.py).
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks, pack
from megafusion.runtime.controlnet import Control, ControlInputError
from megafusion.runtime.flow_controlnet import (ControlledFlowNetworks, check_flow_controlnet_folder,
                                                load_flow_controlnet)
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

PROMPT = "a bridge over a river"
STEPS = 4


def _relerr(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tiny_flow_controlnet(family, seed: int = 0, xlabs: bool = False) -> torch.nn.Module:
    """An SD3ControlNetModel / FluxControlNetModel fitting the tiny family's transformer (one block of each kind),
    with random weights everywhere, its zero-initialized layers included. `xlabs`: a FLUX net with a pixel-space
    hint block (XLabs' kind; patch 2 over the hint block's 1/8-size map makes the image's tokens)."""
    from diffusers import FluxControlNetModel, SD3ControlNetModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family.kind == "sd3":
            net = SD3ControlNetModel(**{**family.transformer, "num_layers": 1})
            zeros = ("controlnet_blocks", "pos_embed_input")
        else:
            extra = {"patch_size": 2, "conditioning_embedding_channels": 16} if xlabs else {}
            net = FluxControlNetModel(**{**family.transformer, "num_layers": 1, "num_single_layers": 1, **extra})
            zeros = ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder",
                     "input_hint_block.conv_out")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(zeros):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def save_tiny_flow_controlnet(family, path, seed: int = 0, xlabs: bool = False):
    tiny_flow_controlnet(family, seed, xlabs).save_pretrained(str(path))
    return path


def control_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand((1, 3, 4, 4), generator=g), size=(h, w), mode="nearest")


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def saved(request, tmp_path_factory):
    """(bundle loaded back from its saved folder, folder, two saved ControlNet folders)."""
    from tests.runtime.test_flow_reference import save_tiny

    root = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, root / "model")
    bundle = load_model(request.param, str(root / "model"))
    nets = [save_tiny_flow_controlnet(bundle.family, root / f"cn{s}", seed=s) for s in (1, 2)]
    return bundle, root / "model", nets


@pytest.fixture
def mean_posterior(monkeypatch):
    """The reference pipelines encode the control image with the posterior's mean, as megafusion does."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _reference_pipe(bundle, root, controlnet_paths):
    from diffusers import (FluxControlNetModel, FluxControlNetPipeline, SD3ControlNetModel,
                           StableDiffusion3ControlNetPipeline)

    sd3 = bundle.family.kind == "sd3"
    cls = SD3ControlNetModel if sd3 else FluxControlNetModel
    nets = [cls.from_pretrained(str(p)) for p in controlnet_paths]
    pipe = (StableDiffusion3ControlNetPipeline if sd3 else FluxControlNetPipeline).from_pretrained(
        str(root), controlnet=nets[0] if len(nets) == 1 else nets)  # a list becomes the Multi model
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(bundle, plan, controls, seed=3, mode="eager"):
    nets = ControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cpu") if controls else None
    opts = FlowGenerationOptions(PROMPT, guidance=bundle.family.default_guidance, seed=seed)
    return FlowMegaFusionPipeline(bundle, nets, "cpu", mode).generate(plan, opts).latent


def _load(bundle, path):
    return load_flow_controlnet(path, bundle.transformer, bundle.family, "cpu", torch.float32)


def _tokens(bundle, latent):
    return pack(latent) if bundle.family.kind == "flux" else latent  # FluxPipeline returns packed tokens


def test_one_stage_equals_diffusers_controlnet_pipeline(saved, mean_posterior):
    bundle, root, paths = saved
    h, w = 128, 160
    image = control_image(h, w)
    plan = validate_plan(bundle.family, [Stage(h, w, STEPS)])
    ours = _ours(bundle, plan, [Control(_load(bundle, paths[0]), image, scale=0.7, start=0.2, end=0.8)])
    ref = _reference_pipe(bundle, root, paths[:1])(
        PROMPT, height=h, width=w, num_inference_steps=STEPS, guidance_scale=bundle.family.default_guidance,
        control_image=image * 2 - 1,  # a tensor goes in as given: the [-1, 1] the pipeline makes of an image
        controlnet_conditioning_scale=0.7, control_guidance_start=0.2, control_guidance_end=0.8,
        generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    assert _relerr(_tokens(bundle, ours), ref) < 1e-5
    assert _relerr(_tokens(bundle, _ours(bundle, plan, [])), ref) > 1e-3  # the ControlNet does act


@pytest.mark.slow
def test_two_controlnets_equal_diffusers_multi_controlnet(saved, mean_posterior):
    bundle, root, paths = saved
    h, w = 128, 128
    images = [control_image(h, w, 0), control_image(h, w, 1)]
    plan = validate_plan(bundle.family, [Stage(h, w, STEPS)])
    controls = [Control(_load(bundle, paths[0]), images[0], 0.5, 0.0, 0.75),
                Control(_load(bundle, paths[1]), images[1], 0.8, 0.25, 1.0)]
    ours = _ours(bundle, plan, controls)
    ref = _reference_pipe(bundle, root, paths)(
        PROMPT, height=h, width=w, num_inference_steps=STEPS, guidance_scale=bundle.family.default_guidance,
        control_image=[i * 2 - 1 for i in images], controlnet_conditioning_scale=[0.5, 0.8],
        control_guidance_start=[0.0, 0.25], control_guidance_end=[0.75, 1.0],
        generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    assert _relerr(_tokens(bundle, ours), ref) < 1e-5
    one = _ours(bundle, plan, controls[:1])
    assert _relerr(_tokens(bundle, one), ref) > 1e-3  # the second ControlNet does add its samples


def test_window_without_steps_gives_the_plain_result(saved):
    """start 0.3 / end 0.5 over 4 steps keeps no step (step i needs i/4 >= 0.3 and (i+1)/4 <= 0.5): the block
    samples are scaled by 0 and the latent is the plain one, bit for bit."""
    bundle, _, paths = saved
    plan = validate_plan(bundle.family, [Stage(128, 128, STEPS)])
    control = Control(_load(bundle, paths[0]), control_image(128, 128), 1.0, 0.3, 0.5)
    plain = _ours(bundle, plan, [])
    assert torch.equal(_ours(bundle, plan, [control]), plain)
    # The comparison can fail: a window keeping one step (0.25 / 0.5 keeps step 1) moves the latent.
    assert _relerr(_ours(bundle, plan, [Control(control.model, control.image, 1.0, 0.25, 0.5)]), plain) > 1e-3


@pytest.mark.slow
def test_two_stage_plan_graphs_mode_equals_eager_bit_for_bit(saved):
    """A 2-stage plan with two ControlNets (the control images encoded at both stage sizes, the window reaching into
    stage 2): the graphs mode's buffered step (uncaptured on the CPU) is the eager step, bit for bit; a second
    generation with another window reuses the buffers and still matches."""
    bundle, _, paths = saved
    plan = validate_plan(bundle.family, [Stage(128, 128, 3), Stage(192, 160, 2)])
    image = control_image(96, 80, 2)  # another size and aspect: resized to each stage
    nets = [_load(bundle, p) for p in paths]
    controls = [Control(nets[0], image, 0.9, 0.0, 0.8), Control(nets[1], image, 0.6, 0.4, 1.0)]
    opts = FlowGenerationOptions(PROMPT, guidance=bundle.family.default_guidance, seed=3, relay="latent")
    eager = FlowMegaFusionPipeline(bundle, ControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cpu"),
                                   "cpu").generate(plan, opts).latent
    assert torch.isfinite(eager).all() and eager.shape[-2:] == (24, 20)
    assert _relerr(eager, FlowMegaFusionPipeline(bundle).generate(plan, opts).latent) > 1e-3

    cn = ControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cpu")
    pipe = FlowMegaFusionPipeline(bundle, cn, "cpu", "graphs")
    assert torch.equal(pipe.generate(plan, opts).latent, eager)
    buffers = {k: [t.data_ptr() for t in v] for k, v in cn.images.items()}
    cn.controls = [controls[0], Control(nets[1], image, 0.6, 0.0, 0.4)]  # stage 1 only
    cn2 = ControlledFlowNetworks(FlowTorchNetworks(bundle), cn.controls, "cpu")
    assert torch.equal(pipe.generate(plan, opts).latent,
                       FlowMegaFusionPipeline(bundle, cn2, "cpu").generate(plan, opts).latent)
    assert {k: [t.data_ptr() for t in v] for k, v in cn.images.items()} == buffers  # filled in place


@pytest.mark.slow
def test_flux_xlabs_kind_controlnet_equals_diffusers(tmp_path, mean_posterior):
    """A FLUX ControlNet with a hint block takes the pixels (no VAE) and repeats its block samples."""
    from tests.runtime.test_flow_reference import save_tiny

    save_tiny("tiny-flux", tmp_path / "model")
    bundle = load_model("tiny-flux", str(tmp_path / "model"))
    path = save_tiny_flow_controlnet(bundle.family, tmp_path / "cn", seed=4, xlabs=True)
    h = w = 128
    image = control_image(h, w, 3)
    plan = validate_plan(bundle.family, [Stage(h, w, STEPS)])
    ours = _ours(bundle, plan, [Control(_load(bundle, path), image, 0.8)])
    ref = _reference_pipe(bundle, tmp_path / "model", [path])(
        PROMPT, height=h, width=w, num_inference_steps=STEPS, guidance_scale=bundle.family.default_guidance,
        control_image=image * 2 - 1, controlnet_conditioning_scale=0.8,
        generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    assert _relerr(pack(ours), ref) < 1e-5
    assert _relerr(pack(_ours(bundle, plan, [])), ref) > 1e-3


def test_controlnet_of_another_architecture_is_refused_by_name(tmp_path):
    from megafusion.core.families import FAMILIES

    sd3, flux = FAMILIES["tiny-sd3"], FAMILIES["tiny-flux"]
    save_tiny_flow_controlnet(sd3, tmp_path / "sd3cn")
    with pytest.raises(ControlInputError, match=r"sd3cn'.*SD3ControlNetModel folder; tiny-flux takes a "
                                                r"FluxControlNetModel"):
        check_flow_controlnet_folder(tmp_path / "sd3cn", flux)
    assert check_flow_controlnet_folder(tmp_path / "sd3cn", sd3) == "SD3ControlNetModel"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ControlInputError, match="no config.json"):
        check_flow_controlnet_folder(tmp_path / "empty", sd3)


def test_controlnet_of_another_width_is_refused_after_load(tmp_path):
    from diffusers import SD3ControlNetModel

    bundle = load_model("tiny-sd3")
    cfg = {**bundle.family.transformer, "num_layers": 1, "num_attention_heads": 4}
    SD3ControlNetModel(**cfg).save_pretrained(str(tmp_path / "wide"))
    with pytest.raises(ControlInputError, match=r"width \(heads x head dim\) 32 does not match the transformer's 16"):
        _load(bundle, tmp_path / "wide")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_cuda_graph_holds_the_controlnet_and_matches_eager(name, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    b = load_model(name, device="cuda", dtype=torch.float32)
    net = tiny_flow_controlnet(b.family, 1).to("cuda").eval()
    plan = validate_plan(b.family, [Stage(128, 128, 3), Stage(192, 160, 2)])
    controls = [Control(net, control_image(128, 128).cuda(), 0.9, 0.0, 0.8)]
    opts = FlowGenerationOptions(PROMPT, guidance=b.family.default_guidance, seed=3)
    eager = FlowMegaFusionPipeline(b, ControlledFlowNetworks(FlowTorchNetworks(b), controls, "cuda")).generate(
        plan, opts).latent
    pipe = FlowMegaFusionPipeline(b, ControlledFlowNetworks(FlowTorchNetworks(b), controls, "cuda"), mode="graphs")
    first = pipe.generate(plan, opts).latent
    assert pipe.graphs.captures == 2 and pipe.graphs.replays == plan.total_steps
    assert _relerr(first, eager) < 1e-4  # same kernels; cuBLAS may pick another algorithm in a capture
    second = pipe.generate(plan, opts).latent
    assert pipe.graphs.captures == 2 and _relerr(second, eager) < 1e-4  # replayed with the counters reset


def _compiled_and_eager(name: str, device: str, stages: list[Stage]):
    """(bundle, plan, options, --mode compiled's controlled networks, the eager loop's latent) for a tiny flow model
    with one tiny ControlNet; the compiled networks run the ControlNet through torch.compile's wrapper of it."""
    b = load_model(name, device=device, dtype=torch.float32)
    net = tiny_flow_controlnet(b.family, 1).to(device).eval()
    plan = validate_plan(b.family, stages)
    controls = [Control(net, control_image(128, 128).to(device), 0.9, 0.0, 0.8)]
    opts = FlowGenerationOptions(PROMPT, guidance=b.family.default_guidance, seed=3)
    eager = FlowMegaFusionPipeline(b, ControlledFlowNetworks(FlowTorchNetworks(b), controls, device), device).generate(
        plan, opts).latent
    nets = ControlledFlowNetworks(FlowTorchNetworks(b, compiled=True), controls, device)
    assert nets.calls[0] is not net and nets.calls[0]._orig_mod is net
    return b, plan, opts, nets, eager


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_compiled_controlnet_matches_eager_cpu(name):
    """--mode compiled's networks on the CPU: the ControlNet compiles whole (fullgraph) beside the transformer, and
    the latent is the eager one (1e-4: Inductor reorders float32 reductions; 8e-6 and 7e-7 measured)."""
    b, plan, opts, nets, eager = _compiled_and_eager(name, "cpu", [Stage(128, 128, 2), Stage(160, 128, 1)])
    assert _relerr(FlowMegaFusionPipeline(b, nets, "cpu").generate(plan, opts).latent, eager) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_cuda_compiled_mode_with_controlnet_matches_eager(name, no_tf32):
    """--mode compiled: the transformer compiled (taking the block samples as inputs) and the ControlNet compiled,
    both inside the stage's graph."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    b, plan, opts, nets, eager = _compiled_and_eager(name, "cuda", [Stage(128, 128, 3), Stage(192, 160, 2)])
    pipe = FlowMegaFusionPipeline(b, nets, mode="compiled")
    assert _relerr(pipe.generate(plan, opts).latent, eager) < 1e-3  # Inductor reorders fp32 reductions
    assert pipe.graphs.captures == 2


def test_image_to_image_keeps_the_global_step_positions(saved):
    """Image to image skips a stage's first steps; the ControlNet window counts them (fractions of the global
    schedule, as for the UNet families). Strength 0.5 over 4 steps runs steps 2 and 3 only: a window over steps 0-1
    (end 0.5) never acts, so the latent is plain image to image bit for bit; a window over 2-3 does act."""
    from megafusion.runtime.img2img import ImageStart
    from tests.helpers import photo as _photo

    bundle, _, paths = saved
    plan = validate_plan(bundle.family, [Stage(128, 128, STEPS)])
    start = ImageStart(_photo(128, 128), 0.5)
    opts = FlowGenerationOptions(PROMPT, guidance=bundle.family.default_guidance, seed=3)
    net, image = _load(bundle, paths[0]), control_image(128, 128)

    def run(controls):
        nets = ControlledFlowNetworks(FlowTorchNetworks(bundle), controls, "cpu") if controls else None
        return FlowMegaFusionPipeline(bundle, nets, "cpu").generate(plan, opts, image=start).latent

    plain = run([])
    assert torch.equal(run([Control(net, image, 1.0, 0.0, 0.5)]), plain)
    assert _relerr(run([Control(net, image, 1.0, 0.5, 1.0)]), plain) > 1e-3
