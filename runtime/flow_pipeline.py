"""The MegaFusion stage loop for flow-matching transformers, SD3 and FLUX (docs/ALGORITHM.md §18), in its notation.

z is the latent, v the (guided) velocity, x0 = z - sigma_t v the predicted clean latent; sigma_t, sigma_s are
a stage's sigmas before and after a step (`flow_schedule`). The shape is runtime/pipeline.py's: denoise a stage,
truncate x0 at its last step, relay x0 to the next size, re-noise z = (1 - sigma') x0_up + sigma' noise.
There is no dilation: a transformer has no convolution to dilate.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..core.dit_loading import DiTBundle
from ..core.plan import StagePlan
from ..engine.flow_networks import FlowTorchNetworks
from .flow_conditioning import FlowConditioning, encode_flow
from .flow_graphs import FlowGraphedDenoiser
from .flow_img2img import encode_flow_image, flow_entry_point, skip_flow_steps
from .flow_schedule import plan_flow_schedule
from .pipeline import SEED_LIMIT, GenerationResult, draw_noise, to_uint8
from .relay import RELAY_MODES, bicubic_resize
from .fused_relay import relay_resize
from .img2img import ImageStart
from .segments import SegmentClock

FLOW_MODES = ("eager", "graphs", "compiled")
"""How the flow pipeline runs its steps (FlowMegaFusionPipeline's `mode`)."""


@dataclass(frozen=True)
class FlowGenerationOptions:
    """What one SD3 / FLUX generation asks for, besides the stage plan."""

    prompt: str
    """Text prompt."""
    negative_prompt: str = ""
    """SD3's negative prompt (encoded, also when empty); FLUX takes none."""
    guidance: float = 7.0
    """SD3: the CFG weight w (off at w <= 1). FLUX: the value of its guidance embedding (3.5 by default)."""
    seed: int = 0
    """Seed of the one generator that draws every noise tensor."""
    reschedule: bool = True
    """Each stage's own timestep shift; off: every stage uses stage 1's."""
    relay: str = "pixel"
    """`pixel` (VAE decode, bicubic, encode) or `latent` (bicubic on the latent)."""

    def __post_init__(self):
        if self.relay not in RELAY_MODES:
            raise ValueError(f"unknown relay mode {self.relay!r}; choose one of {', '.join(RELAY_MODES)}")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer 0 <= seed < 2^64, got {self.seed!r}")


def guided_velocity(nets: FlowTorchNetworks, z: torch.Tensor, t: torch.Tensor, cond: FlowConditioning,
                    w: float, step: torch.Tensor | None = None) -> torch.Tensor:
    """v = v_u + w (v_c - v_u) over the batch [negative, prompt] (SD3); FLUX's one pass takes w as its embedding.
    `step`: the global step index, for networks that read it (`takes_step`: ControlNets, runtime/flow_controlnet)."""
    sample = torch.cat([z, z]) if cond.cfg else z
    kw = {} if step is None else {"step": step}
    v = nets.velocity(sample, t.expand(sample.shape[0]), cond.states, cond.pooled, w, **kw)
    if not cond.cfg:
        return v
    v_u, v_c = v.chunk(2)
    return v_u + w * (v_c - v_u)


def flow_relay(nets: FlowTorchNetworks, x0: torch.Tensor, height: int, width: int, scaling: float, shift: float,
               vae_scale: int, mode: str = "pixel") -> torch.Tensor:
    """x0 latent of stage k -> x0 latent at stage k+1's pixel size: decode(x0 / scaling + shift), clamp, bicubic,
    clamp, (encode - shift) * scaling; or bicubic on the latent itself."""
    if mode == "pixel":
        image = nets.vae_decode(x0 / scaling + shift)
        return (nets.vae_encode(relay_resize(image, height, width, nets.vae_dtype)) - shift) * scaling
    if mode == "latent":
        return bicubic_resize(x0, height // vae_scale, width // vae_scale)
    raise ValueError(f"unknown relay mode {mode!r}; choose one of {', '.join(RELAY_MODES)}")


class FlowMegaFusionPipeline:
    """Runs a stage plan on an SD3 or FLUX model's networks."""

    def __init__(self, bundle: DiTBundle, networks: FlowTorchNetworks | None = None, device=None,
                 mode: str = "eager"):
        """`mode`: `eager` (step by step), `graphs` (one CUDA graph per stage shape; on the CPU the same buffered
        step runs eagerly) or `compiled` (graphs around the torch.compile'd transformer; without `networks`
        the bundle's transformer is compiled, given `networks` are used as they come)."""
        if mode not in FLOW_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(FLOW_MODES)}")
        self.bundle = bundle
        self.family = bundle.family
        self.mode = mode
        self.nets = networks if networks is not None else FlowTorchNetworks(bundle, compiled=mode == "compiled")
        self.device = torch.device(device) if device is not None else bundle.transformer.device
        # diffusers draws the latents in the text encoders' dtype, which is the transformer's in every pipeline.
        self.noise_dtype = self.nets.transformer_dtype
        self.graphs = None
        """Runs each stage's steps as replays of one captured step (modes graphs and compiled); None: eager."""
        if mode != "eager":
            self.graphs = FlowGraphedDenoiser(self.nets, self.device, self.noise_dtype,
                                              capture=self.device.type == "cuda")

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate(self, plan: StagePlan, opts: FlowGenerationOptions,
                 on_step: Callable[[int, int], None] | None = None,
                 on_segment: Callable[[str, float], None] | None = None,
                 image: ImageStart | None = None) -> GenerationResult:
        """One image; `on_step(k, i)` after each step, `on_segment(name, seconds)` after each segment.
        `image`: start from a photo (image to image, docs/ALGORITHM.md §18.1; its entry under the flow rule)."""
        dev, fam = self.device, self.family
        cfg = self.bundle.vae.config
        scaling, shift = float(cfg.scaling_factor), float(cfg.shift_factor or 0.0)
        vs, ch = fam.vae_scale, fam.latent_channels
        clock = SegmentClock(dev, on_segment)
        mark, timings = clock.mark, clock.timings

        cond = encode_flow(self.nets, self.bundle, opts.prompt, opts.negative_prompt, opts.guidance, dev)
        schedules = plan_flow_schedule(plan, fam, opts.reschedule)
        generator = torch.Generator("cpu").manual_seed(opts.seed)
        entry = flow_entry_point(plan, image.strength, image.start_stage) if image is not None else None
        mark("text encoders")
        stepped = getattr(self.nets, "takes_step", False)  # ControlNets: scale and image per global step / stage
        if stepped:
            self.nets.prepare_plan(plan)
            mark("control images")

        z = x0 = None
        last_k = len(plan.stages) - 1
        for k, stage in enumerate(plan.stages):
            first = sum(s.steps for s in plan.stages[:k])  # global index of this stage's first step
            if entry is not None and k < entry.stage:
                continue  # image to image: the photo enters at a later stage
            if entry is not None and k == entry.stage:
                schedules[k] = skip_flow_steps(schedules[k], entry.step)
            sigma_t, d_sigma, timestep = schedules[k].tensors(dev)
            steps = len(schedules[k].sigma_t)
            first += stage.steps - steps  # image to image: skipped steps keep their places in the global schedule
            h, w = stage.height // vs, stage.width // vs
            noise = draw_noise((1, ch, h, w), generator, self.noise_dtype, dev)
            if entry is not None and k == entry.stage:
                # The photo as this stage's x0, noised to its first kept sigma (docs/ALGORITHM.md §18.1), in the
                # latent dtype as diffusers' prepare_latents leaves it.
                x0_photo = encode_flow_image(self.nets, image.image, stage.height, stage.width, scaling, shift, dev)
                z = ((1 - sigma_t[0]) * x0_photo + sigma_t[0] * noise).to(self.noise_dtype).float()
                mark("encode image")
            elif k == 0:
                z = noise
            else:
                # Relay the truncated x0 to this stage's size, re-noise it to this stage's first (shifted) sigma'.
                x0_up = flow_relay(self.nets, x0, stage.height, stage.width, scaling, shift, vs, opts.relay)
                z = (1 - sigma_t[0]) * x0_up + sigma_t[0] * noise
                mark(f"relay {k}->{k + 1}")
            if self.graphs is not None:
                # Same step, replayed (docs/ALGORITHM.md §18); a non-final stage's last x0 is the truncation x0.
                z, x0 = self.graphs.run_flow_stage(z, sigma_t, d_sigma, timestep, cond, opts.guidance, steps,
                                                   first_step=first)
                for i in range(steps if on_step is not None else 0):
                    on_step(k, i)
            for i in range(steps if self.graphs is None else 0):
                step = torch.tensor(first + i, device=dev) if stepped else None
                v = guided_velocity(self.nets, z, timestep[i], cond, opts.guidance, step)
                x0 = z - sigma_t[i] * v
                if on_step is not None:
                    on_step(k, i)
                if k < last_k and i == steps - 1:
                    break  # truncate: x0 from the pre-update latent; this step's update is not needed
                z = z + d_sigma[i] * v  # Euler: z_s = z_t + (sigma_s - sigma_t) v
                z = z.to(self.noise_dtype).float()  # the pipelines keep the latent in the model's dtype
            mark(f"stage {k + 1} ({stage.width}x{stage.height}, {steps} steps)")

        image = self.nets.vae_decode(z / scaling + shift)
        pixels = to_uint8(image)
        top = (pixels.shape[0] - plan.output_height) // 2
        left = (pixels.shape[1] - plan.output_width) // 2
        out = pixels[top:top + plan.output_height, left:left + plan.output_width].cpu().numpy()
        mark("decode")
        peak = clock.peak_memory()
        return GenerationResult(np.ascontiguousarray(out), plan, timings, peak, z)
