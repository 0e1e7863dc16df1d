"""Pixel-space MegaFusion on DeepFloyd IF (docs/ALGORITHM.md §20), in its notation.

x is the image being denoised (3 channels, [-1, 1] when clean), eps the guided noise prediction, v the
UNet's variance interpolation in [-1, 1], x0 the (thresholded) clean-image estimate. Each cascade stage
(IF stage I, IF stage II) runs its own coarse-to-fine plan: DDPM steps at each MegaFusion stage, truncate
x0 at the last step of a stage, relay it bicubically, re-noise it at the next stage's first timestep.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..core.if_family import IFFamily
from ..core.if_loading import IFBundle
from ..core.plan import PlanError, Stage, StagePlan
from ..engine.if_networks import IFNetworks, IFTorchNetworks
from .pipeline import MAX_DILATION, SEED_LIMIT, draw_noise, to_uint8
from .pixel_graphs import PixelGraphedDenoiser
from .pixel_schedule import DDPMCoefficients, ddpm_alphas_cumprod, plan_ddpm_schedule
from .relay import resize_clamped
from .segments import SegmentClock


PIXEL_MODES = ("eager", "graphs", "compiled")
"""How the pixel pipeline runs its steps (IFMegaFusionPipeline's `mode`)."""


@dataclass(frozen=True)
class PixelOptions:
    """What one IF generation asks for, besides the two plans."""

    prompt: str
    negative_prompt: str = ""
    guidance_1: float = 7.0
    """CFG weight of cascade stage I (the paper's 7.0); CFG is off at w <= 1."""
    guidance_2: float = 4.0
    """CFG weight of cascade stage II (the paper's 4.0)."""
    seed: int = 0
    reschedule: bool = True
    """Noise re-scheduling at MegaFusion stages after the first, in both cascade stages."""
    dilation: int = 2
    """Mid-block dilation at MegaFusion stages after the first (1 turns it off)."""

    def __post_init__(self):
        for name in ("guidance_1", "guidance_2"):
            g = getattr(self, name)
            if not (math.isfinite(g) and g >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {g!r}")
        if not 1 <= self.dilation <= MAX_DILATION:
            raise ValueError(f"dilation must be between 1 and {MAX_DILATION}, got {self.dilation}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer 0 <= seed < 2^64, got {self.seed!r}")


@dataclass
class PixelResult:
    """The images of both cascade stages and what they took."""

    image: np.ndarray
    """(H, W, 3) uint8 of the last cascade stage run."""
    sample_1: torch.Tensor
    """Cascade stage I's final sample x (1, 3, H, W), float32, as IFPipeline returns it with output_type "pt"."""
    sample_2: torch.Tensor | None
    """Cascade stage II's final sample, or None when only stage I ran."""
    timings: list[tuple[str, float]] = field(default_factory=list)


def pixel_plan(family: IFFamily, cascade: int, stages: list[Stage] | tuple | None = None) -> StagePlan:
    """A validated plan for cascade stage 1 or 2 (the family's default, the paper's, without `stages`)."""
    if stages is None:
        stages = [Stage(*s) for s in (family.stages_1 if cascade == 1 else family.stages_2)]
    stages = [s if isinstance(s, Stage) else Stage(*s) for s in stages]
    if not stages:
        raise PlanError("a plan needs at least one stage")
    m = family.pixel_multiple(cascade)
    for s in stages:
        if s.height <= 0 or s.width <= 0 or s.height % m or s.width % m:
            raise PlanError(f"stage {s}: IF stage {'I' * cascade} sides must be positive multiples of {m}")
        if s.steps < 1:
            raise PlanError(f"stage {s}: steps must be >= 1")
    for a, b in zip(stages, stages[1:]):
        if b.height < a.height or b.width < a.width:
            raise PlanError(f"stage {b} is smaller than the stage before it ({a})")
    if sum(s.steps for s in stages) > 1000:
        raise PlanError(f"{sum(s.steps for s in stages)} steps in all; at most 1000")
    last = stages[-1]
    return StagePlan(tuple(stages), last.height, last.width)


def threshold(x0: torch.Tensor, config: dict) -> torch.Tensor:
    """IF's dynamic thresholding (or plain clipping), as DDPMScheduler applies it to x0 (in float32)."""
    if config.get("thresholding"):
        flat = x0.float().reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), config["dynamic_thresholding_ratio"], dim=1)
        s = s.clamp(1.0, config["sample_max_value"]).unsqueeze(1)
        return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)
    if config.get("clip_sample"):
        r = config.get("clip_sample_range", 1.0)
        return x0.clamp(-r, r)
    return x0


class IFMegaFusionPipeline:
    """Runs MegaFusion plans on an IF cascade's UNets: its torch modules (eager, graphed, compiled) or engines."""

    def __init__(self, bundle: IFBundle, device=None, mode: str = "eager", networks: IFNetworks | None = None):
        """`mode`: `eager` (step by step), `graphs` (one CUDA graph per stage shape; on the CPU the same buffered
        step runs eagerly) or `compiled` (graphs around torch.compile'd UNets). `networks`: built engines
        (engine/if_networks.IFEngineNetworks) instead of the bundle's modules, in `eager` or `graphs` mode."""
        if mode not in PIXEL_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(PIXEL_MODES)}")
        if mode == "compiled" and networks is not None:
            raise ValueError("mode 'compiled' compiles the bundle's modules; give networks with eager or graphs")
        self.bundle = bundle
        self.family = bundle.family
        self.device = torch.device(device) if device is not None else bundle.unet_1.device
        self.mode = mode
        self.nets = networks if networks is not None else IFTorchNetworks(bundle, compiled=mode == "compiled")
        self.graphs = None
        """Runs each stage's steps as replays of one captured step (modes graphs and compiled); None: eager."""
        if mode != "eager":
            sched = {1: self.family.scheduler_1, 2: self.family.scheduler_2}
            self.graphs = PixelGraphedDenoiser(self.nets, self.device, sched, capture=self.device.type == "cuda")

    def encode(self, prompt: str, negative_prompt: str, cfg: bool) -> torch.Tensor:
        """T5 embeddings [negative, prompt] (or [prompt] without CFG), as IFPipeline.encode_prompt makes them:
        lower-cased and stripped, padded to 77 with the attention mask given to the encoder."""
        texts = ([negative_prompt] if cfg else []) + [prompt]
        tok = self.bundle.tokenizer([t.lower().strip() for t in texts], padding="max_length",
                                    max_length=self.family.max_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt")
        enc = self.bundle.text_encoder
        out = enc(tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device))[0]
        return out.to(self.nets.unet_dtype(1))

    def _guided(self, cascade, x_in, t, states, class_labels, w: float, cfg: bool, dilation: int):
        """(eps, v): eps = eps_u + w (eps_c - eps_u); v is the conditional half's variance channels."""
        model_in = torch.cat([x_in, x_in]) if cfg else x_in
        out = self.nets.unet(cascade, model_in, t, states, class_labels, dilation)
        if not cfg:
            return out[:, :3], out[:, 3:]
        (eps_u, _), (eps_c, v) = (h.split(3, dim=1) for h in out.chunk(2))
        return eps_u + w * (eps_c - eps_u), v

    def run_cascade(self, cascade: int, plan: StagePlan, states: torch.Tensor, w: float, opts: PixelOptions,
                    generator: torch.Generator, low_res: torch.Tensor | None = None,
                    on_step: Callable[[int, int], None] | None = None,
                    mark: Callable[[str], None] | None = None) -> torch.Tensor:
        """One cascade stage's plan; returns its final sample x (1, 3, H, W) float32."""
        fam, dev = self.family, self.device
        sched = fam.scheduler_1 if cascade == 1 else fam.scheduler_2
        noise_dtype = self.nets.unet_dtype(cascade)
        cfg = w > 1.0
        schedules = plan_ddpm_schedule(plan, sched, opts.reschedule)
        labels = None
        if cascade == 2:
            abar_aug = float(ddpm_alphas_cumprod(fam.noising_scheduler)[fam.noise_level])
            labels = torch.full((2 if cfg else 1,), fam.noise_level, device=dev, dtype=torch.int64)
        x = x0 = None
        last_k = len(plan.stages) - 1
        for k, stage in enumerate(plan.stages):
            c = schedules[k].coefficients(dev)
            shape = (1, 3, stage.height, stage.width)
            if k == 0:
                x = draw_noise(shape, generator, noise_dtype, dev)
            else:
                # Relay: the truncated x0 to this stage's size, re-noised to this stage's first timestep t'
                # with this stage's (re-scheduled) abar' (paper Eq. 6).
                x0_up = resize_clamped(x0, stage.height, stage.width)
                x = c.sqrt_abar_t[0] * x0_up + c.sqrt_one_minus_abar_t[0] * draw_noise(shape, generator, noise_dtype, dev)
            cond = None
            if cascade == 2:
                # IF's conditioning: the stage I image, bilinear to this size, noised to noise_level.
                up = F.interpolate(low_res.to(noise_dtype), (stage.height, stage.width), mode="bilinear",
                                   align_corners=True).float()
                n = draw_noise(shape, generator, noise_dtype, dev)
                cond = math.sqrt(abar_aug) * up + math.sqrt(1.0 - abar_aug) * n
            delta = 1 if k == 0 else opts.dilation
            if self.graphs is not None:
                # Same step, replayed (docs/ALGORITHM.md §20); a non-final stage's last x0 is the truncation x0.
                x, x0 = self.graphs.run_pixel_stage(cascade, x, cond, c, states, labels, w, cfg, delta, stage.steps,
                                                    k < last_k, generator, noise_dtype)
                for i in range(stage.steps if on_step is not None else 0):
                    on_step(k, i)
            else:
                x, x0 = self._stage(cascade, x, cond, c, sched, states, labels, w, cfg, delta, stage.steps,
                                    k < last_k, generator, noise_dtype, lambda i, k=k: on_step and on_step(k, i))
            if mark is not None:
                mark(f"stage {'I' * cascade}.{k + 1} ({stage.width}x{stage.height}, {stage.steps} steps)")
        return x

    def _stage(self, cascade, x, cond, c: DDPMCoefficients, sched: dict, states, labels, w, cfg, dilation: int,
               steps: int, truncate: bool, generator, noise_dtype, on_step):
        """DDPM steps with learned variance; returns (x, x0 of the last step)."""
        for i in range(steps):
            x_in = x if cond is None else torch.cat([x, cond], dim=1)
            eps, v = self._guided(cascade, x_in, c.timesteps[i], states, labels, w, cfg, dilation)
            x0 = threshold((x - c.sqrt_one_minus_abar_t[i] * eps) / c.sqrt_abar_t[i], sched)   # paper Eq. 5
            on_step(i)
            if truncate and i == steps - 1:
                break  # truncate: x0 from the pre-update sample; this step's update is not needed
            mean = c.coef_x0[i] * x0 + c.coef_xt[i] * x
            if c.add_noise[i]:
                frac = (v + 1) / 2
                log_var = frac * c.log_beta[i] + (1 - frac) * c.log_beta_tilde[i]
                x = mean + torch.exp(0.5 * log_var) * draw_noise(tuple(x.shape), generator, noise_dtype, self.device)
            else:
                x = mean
        return x, x0

    @torch.no_grad()
    def generate(self, plan_1: StagePlan, plan_2: StagePlan | None, opts: PixelOptions,
                 on_step: Callable[[int, int], None] | None = None) -> PixelResult:
        """Stage I's plan, then (given plan_2 and a stage II UNet) stage II's on stage I's output."""
        if plan_2 is not None and self.bundle.unet_2 is None:
            raise ValueError("a stage II plan needs the stage II UNet (load its folder too)")
        clock = SegmentClock(self.device)
        mark, timings = clock.mark, clock.timings

        cfg = max(opts.guidance_1, opts.guidance_2 if plan_2 is not None else 0.0) > 1.0
        states_both = self.encode(opts.prompt, opts.negative_prompt, cfg)
        mark("text encoder")
        generator = torch.Generator("cpu").manual_seed(opts.seed)
        s1 = states_both if opts.guidance_1 > 1.0 or not cfg else states_both[1:]
        x1 = self.run_cascade(1, plan_1, s1, opts.guidance_1, opts, generator, on_step=on_step, mark=mark)
        x2 = None
        if plan_2 is not None:
            s2 = (states_both if opts.guidance_2 > 1.0 or not cfg else states_both[1:]).to(self.nets.unet_dtype(2))
            x2 = self.run_cascade(2, plan_2, s2, opts.guidance_2, opts, generator, low_res=x1,
                                  on_step=on_step, mark=mark)
        final = x2 if x2 is not None else x1
        image = to_uint8(final).cpu().numpy()
        return PixelResult(np.ascontiguousarray(image), x1, x2, timings)
