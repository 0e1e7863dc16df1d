"""Image to image for SD3 and FLUX (docs/ALGORITHM.md §18.1): one stage is diffusers' StableDiffusion3Img2Img /
FluxImg2Img pipeline; several stages skip what the strength or the start stage leaves out.

The tiny models are saved as a diffusers folder and loaded back (as tests/runtime/test_flow_reference.py does).
The reference pipelines get the photo's latent (posterior mean - shift) * c, which they take as it is (they
sample the posterior of a pixel image), so both start from the same latent and draw the same noise. Tolerance:
float32 on CPU, sigmas in float64 here and float32 in diffusers: 1e-5 relative on the final latent.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks, pack
from megafusion.runtime.flow_img2img import encode_flow_image, flow_entry_point, flow_steps_skipped
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline
from megafusion.runtime.img2img import ImageInputError, ImageStart
from tests.helpers import photo as _photo, relerr as _relerr
from tests.runtime.test_flow_reference import save_tiny

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def saved(request, tmp_path_factory):
    """(name, the bundle loaded from a saved folder, diffusers' img2img pipeline loaded from the same folder)."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, root)
    base, cls = ((StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline) if request.param == "tiny-sd3"
                 else (FluxPipeline, FluxImg2ImgPipeline))
    pipe = cls(**base.from_pretrained(root).components)
    pipe.set_progress_bar_config(disable=True)
    return request.param, load_model(request.param, str(root)), pipe


# 4 steps: strength 0.6 keeps 3 (t_start = int(1.6) = 1; the UNet rule, int(2.4) = 2, would keep 2), 0.3 keeps 2.
@pytest.mark.parametrize("strength", [0.6, *(pytest.param(s, marks=pytest.mark.slow) for s in (1.0, 0.3))])
def test_one_stage_equals_diffusers_img2img(saved, strength):
    name, bundle, pipe = saved
    fam, g, steps = bundle.family, bundle.family.default_guidance, 4
    h, w = 128, 176
    plan = validate_plan(fam, [Stage(h, w, steps)])
    photo = _photo(h, w)
    opts = FlowGenerationOptions(PROMPT, guidance=g, seed=5)
    ran = []
    ours = FlowMegaFusionPipeline(bundle).generate(plan, opts, on_step=lambda k, i: ran.append((k, i)),
                                                   image=ImageStart(photo, strength)).latent
    assert len(ran) == steps - flow_steps_skipped(steps, strength)

    cfg = bundle.vae.config
    latent = encode_flow_image(FlowTorchNetworks(bundle), photo, h, w, float(cfg.scaling_factor),
                               float(cfg.shift_factor or 0.0), "cpu")
    ref = pipe(PROMPT, image=latent, strength=strength, height=h, width=w, num_inference_steps=steps,
               guidance_scale=g, generator=torch.Generator().manual_seed(5), output_type="latent").images
    if name == "tiny-flux":
        ours = pack(ours)  # FluxImg2ImgPipeline returns its packed tokens
    assert ours.shape == ref.shape
    assert _relerr(ours, ref) < 1e-5
    if strength < 1:  # the photo shows through: another photo gives another latent
        other = FlowMegaFusionPipeline(bundle).generate(plan, opts, image=ImageStart(_photo(h, w, 1), strength))
        assert _relerr(pack(other.latent) if name == "tiny-flux" else other.latent, ref) > 1e-3


class _RecordsSamples(FlowTorchNetworks):
    """Keeps every latent the transformer is called with, in order."""

    def __init__(self, bundle):
        super().__init__(bundle)
        self.samples: list[torch.Tensor] = []

    def velocity(self, z, timestep, states, pooled, guidance):
        self.samples.append(z[:1].clone())
        return super().velocity(z, timestep, states, pooled, guidance)


def _samples(bundle, plan, image, reschedule=True):
    nets = _RecordsSamples(bundle)
    opts = FlowGenerationOptions(PROMPT, guidance=bundle.family.default_guidance, seed=2, reschedule=reschedule,
                                 relay="latent")
    result = FlowMegaFusionPipeline(bundle, nets).generate(plan, opts, image=image)
    return nets.samples, result


def test_two_stage_first_stage_is_the_one_stage_run(saved):
    """Entering a 2-stage plan in stage 1, stage 1's steps are those of a one-stage plan of as many steps at stage
    1's size with the same strength (same global list, same shift), up to the truncation; stage 2 then runs."""
    _, bundle, _ = saved
    fam = bundle.family
    photo = _photo(150, 120)  # any size: resized to the entry stage's
    two = validate_plan(fam, [Stage(128, 128, 4), Stage(192, 160, 2)])
    one = validate_plan(fam, [Stage(128, 128, 6)])
    start = ImageStart(photo, 0.8)  # t_start = int(6 - 4.8) = 1: 3 of stage 1's 4 steps run
    assert flow_entry_point(two, 0.8, None).stage == 0
    got, result = _samples(bundle, two, start)
    want, _ = _samples(bundle, one, start)
    assert len(got) == 3 + 2 and len(want) == 5
    for a, b in zip(got[:3], want[:3]):
        assert _relerr(a, b) < 1e-6
    assert got[3].shape[-2:] == (24, 20) and result.latent.shape[-2:] == (24, 20)
    assert _relerr(got[3][..., :16, :16], want[3]) > 1e-2  # stage 2 is not the one-stage run's step 4


@pytest.mark.slow
def test_start_stage_two_is_a_one_stage_plan_at_its_size(saved):
    """--start-stage 2 runs stage 2's steps at stage 2's size: a one-stage plan at that size whose strength keeps
    the same last 2 of 6 steps, with the same shift (SD3 without re-scheduling keeps stage 1's shift, which is a
    one-stage plan's; FLUX re-scheduled takes the stage's own token count, as a one-stage plan does)."""
    name, bundle, _ = saved
    fam = bundle.family
    photo = _photo(200, 180)
    two = validate_plan(fam, [Stage(128, 128, 4), Stage(192, 160, 2)])
    one = validate_plan(fam, [Stage(192, 160, 6)])
    reschedule = name == "tiny-flux"
    got, a = _samples(bundle, two, ImageStart(photo, None, 2), reschedule)
    want, b = _samples(bundle, one, ImageStart(photo, 2 / 6), reschedule)  # t_start = int(6 - 2) = 4
    assert len(got) == len(want) == 2
    assert _relerr(a.latent, b.latent) < 1e-6
    assert _relerr(a.latent, got[0]) > 1e-2  # the two steps moved it


def test_entry_follows_the_flow_rule():
    from megafusion.core.families import get_family

    fam = get_family("tiny-sd3")
    plan = validate_plan(fam, [Stage(128, 128, 4), Stage(192, 160, 2)])  # steps 0-3, 4-5
    assert flow_entry_point(plan, 1.0) == flow_entry_point(plan, None, 1)
    e = flow_entry_point(plan, 0.01)  # int(6 - 0.06) = 5: one step, where the UNet rule runs none
    assert (e.stage, e.step, e.global_step) == (1, 1, 5)
    assert flow_entry_point(plan, None, 2).global_step == 4
    for strength, start, message in ((0.0, None, "--strength 0.0: must be a number in (0, 1]"),
                                     (1.5, None, "--strength 1.5"), (float("nan"), None, "--strength nan"),
                                     (None, 3, "--start-stage 3: the plan has stages 1 to 2"),
                                     (0.9, 2, "stage 2 takes strengths above 0 up to 0.3333")):
        with pytest.raises(ImageInputError, match=message.replace("(", r"\(").replace("]", r"\]")):
            flow_entry_point(plan, strength, start)


def _graphs_and_eager(name, device, dtype=torch.float32):
    bundle = load_model(name, device=device, dtype=dtype)
    plan = validate_plan(bundle.family, [Stage(128, 128, 4), Stage(192, 160, 2)])
    opts = FlowGenerationOptions(PROMPT, guidance=bundle.family.default_guidance, seed=4, relay="latent")
    start = ImageStart(_photo(128, 128), 0.8)  # enters stage 1 at its second step
    eager = FlowMegaFusionPipeline(bundle).generate(plan, opts, image=start)
    pipe = FlowMegaFusionPipeline(bundle, mode="graphs")
    return pipe, pipe.generate(plan, opts, image=start), eager


def test_graphs_mode_on_cpu_equals_eager_bit_for_bit():
    """The buffered step (CUDA graphs' body, run eagerly on the CPU) takes the shortened entry stage."""
    _, graphed, eager = _graphs_and_eager("tiny-flux", "cpu")
    assert torch.equal(graphed.latent, eager.latent)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_img2img_matches_eager(name, dtype):
    """The entry stage replays its captured step for the steps that run (3 of 4), stage 2 for its 2."""
    pipe, graphed, eager = _graphs_and_eager(name, "cuda", dtype)
    assert pipe.graphs.captures == 2 and pipe.graphs.replays == 3 + 2
    tol = 1e-4 if dtype == torch.float32 else 0.2  # as tests/runtime/test_flow_graphs.py: cuBLAS algorithm choice
    assert _relerr(graphed.latent, eager.latent) < tol
