"""A one-stage plan at native size is diffusers' own SD3 / FLUX pipeline (FlowMatchEulerDiscreteScheduler),
and a later stage, from its re-noised start, is that pipeline at the stage's own shift.

The tiny models are saved with `save_pretrained` as a diffusers folder and loaded back, once through
megafusion's loader (`core/dit_loading.py`) and once through the diffusers pipeline's `from_pretrained`; both
get the same prompt and seed. Tolerance: float32 on CPU; megafusion computes the shifted sigmas in float64 and
rounds them to float32 where diffusers computes them in float32, so latents agree to 1e-5 relative.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks, pack
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline
from megafusion.runtime.flow_schedule import base_sigmas, plan_flow_schedule

PROMPT = "a red fox in the snow"
STEPS = 4


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def save_tiny(name: str, root) -> None:
    """A diffusers folder of the tiny model `name` (random weights, built-in tokenizers)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    b = load_model(name)
    sched = FlowMatchEulerDiscreteScheduler(**b.family.scheduler)
    te, tok = b.text_encoders, b.tokenizers
    if b.family.kind == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=b.transformer, scheduler=sched, vae=b.vae, text_encoder=te[0],
                                        tokenizer=tok[0], text_encoder_2=te[1], tokenizer_2=tok[1],
                                        text_encoder_3=te[2], tokenizer_3=tok[2])
    else:
        pipe = FluxPipeline(transformer=b.transformer, scheduler=sched, vae=b.vae, text_encoder=te[0],
                            tokenizer=tok[0], text_encoder_2=te[1], tokenizer_2=tok[1])
    pipe.save_pretrained(root)


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def saved(request, tmp_path_factory):
    """(name, folder, the diffusers pipeline loaded from the folder)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, root)
    cls = StableDiffusion3Pipeline if request.param == "tiny-sd3" else FluxPipeline
    pipe = cls.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return request.param, root, pipe


def _reference(pipe, height, width, guidance, seed):
    out = pipe(PROMPT, height=height, width=width, num_inference_steps=STEPS, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
    return out.images


@pytest.mark.parametrize("height,width", [(128, 128), (128, 176)])
def test_one_stage_plan_is_the_diffusers_pipeline(saved, height, width):
    name, root, pipe = saved
    bundle = load_model(name, str(root))
    assert bundle.source == str(root)
    # The folder's scheduler config (every default written out) is the one the stage loop follows.
    assert load_model(name).family.scheduler.items() <= bundle.family.scheduler.items()
    g = bundle.family.default_guidance
    plan = validate_plan(bundle.family, [Stage(height, width, STEPS)])
    ours = FlowMegaFusionPipeline(bundle).generate(plan, FlowGenerationOptions(PROMPT, guidance=g, seed=3)).latent
    ref = _reference(pipe, height, width, g, 3)
    if name == "tiny-flux":
        ours = pack(ours)  # FluxPipeline returns its packed tokens
    assert ours.shape == ref.shape
    assert _relerr(ours, ref) < 1e-5
    # The comparison can fail: another seed gives another latent.
    assert _relerr(_reference(pipe, height, width, g, 4), ref) > 0.1


class _RecordsFirstSample(FlowTorchNetworks):
    """Keeps the first latent each stage size is called with: stage 2's re-noised start."""

    def __init__(self, bundle):
        super().__init__(bundle)
        self.first: dict[tuple[int, int], torch.Tensor] = {}

    def velocity(self, z, timestep, states, pooled, guidance):
        self.first.setdefault(tuple(z.shape[-2:]), z[:1].clone())
        return super().velocity(z, timestep, states, pooled, guidance)


@pytest.mark.slow
def test_second_stage_is_the_diffusers_pipeline_at_its_own_shift(saved):
    """From the re-noised start, stage 2 is diffusers' pipeline given that start (`latents`), this stage's slice
    of the global list (`sigmas`) and the stage's shift (SD3: a scheduler with shift a_2; FLUX: the pipeline's own
    mu from the stage's token count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    name, root, pipe = saved
    bundle = load_model(name, str(root))
    fam, g = bundle.family, bundle.family.default_guidance
    plan = validate_plan(fam, [Stage(128, 128, 3), Stage(192, 160, 2)])
    nets = _RecordsFirstSample(bundle)
    ours = FlowMegaFusionPipeline(bundle, nets).generate(plan, FlowGenerationOptions(PROMPT, guidance=g,
                                                                                     seed=5)).latent
    start = nets.first[(24, 20)]
    sched = plan_flow_schedule(plan, fam)[1]
    s = base_sigmas(plan.total_steps, fam)[3:]
    saved_scheduler = pipe.scheduler
    if name == "tiny-sd3":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(**{**fam.scheduler, "shift": sched.shift})
    try:
        ref = pipe(PROMPT, height=192, width=160, num_inference_steps=2, sigmas=list(s), guidance_scale=g,
                   latents=pack(start) if name == "tiny-flux" else start, output_type="latent").images
    finally:
        pipe.scheduler = saved_scheduler
    if name == "tiny-flux":
        ours = pack(ours)
    assert _relerr(ours, ref) < 1e-5
    assert _relerr(start if name == "tiny-sd3" else pack(start), ref) > 0.1  # the two steps did move it
