"""CUDA-graphed DDPM steps of the pixel pipeline (docs/ALGORITHM.md §20), one graph per `PixelGraphKey`.

The captured step is the whole step of `IFMegaFusionPipeline._stage`: the UNet on the CFG batch, the guidance
combine and the learned-variance split, x0 with IF's thresholding, the posterior mean and the variance noise.
As in runtime/graphs.py, the step's timestep and coefficients are gathered from device tables by a device step
counter the graph advances. The variance noise cannot be drawn inside a graph from the CPU generator, so a stage
draws all of its steps' noise up front, in the order the eager loop draws it (nothing else draws in between),
into a device table the step reads by the same counter: the same noise stream, so the same image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.if_networks import IFNetworks
from .graphs import MAX_STAGE_STEPS, GraphedDenoiser
from .pipeline import draw_noise
from .pixel_schedule import DDPMCoefficients

_ROWS = ("sqrt_abar_t", "sqrt_one_minus_abar_t", "coef_x0", "coef_xt", "log_beta", "log_beta_tilde")
"""The DDPMCoefficients fields in the device table, by row; one more row holds the noise mask."""


@dataclass(frozen=True)
class PixelGraphKey:
    """What a captured pixel step depends on: one graph per distinct key."""

    cascade: int
    """IF cascade stage (1 or 2): which UNet, which thresholding, whether a conditioning image is concatenated."""
    batch: int
    """UNet batch (2 with classifier-free guidance)."""
    height: int
    width: int
    dilation: int
    """Mid-block dilation (1: the standard UNet)."""
    images: int = 1
    """Samples denoised together (GraphedDenoiser.replay_timing reads it); always 1 here."""


@dataclass
class PixelStepBuffers:
    """Static inputs and outputs of a captured pixel step; the graph reads and writes only these."""

    x: torch.Tensor
    """(1, 3, H, W) float32 sample, updated in place by each replay."""
    x0: torch.Tensor
    """(1, 3, H, W) float32 thresholded x0 of the last replayed step (the truncation x0)."""
    cond: torch.Tensor | None
    """(1, 3, H, W) float32 noised, upscaled stage I image (cascade 2), concatenated to x on channels."""
    step: torch.Tensor
    """() int64 device step counter, advanced by each replay."""
    tables: torch.Tensor
    """(7, MAX_STAGE_STEPS) float32: the rows of _ROWS, then 1 where the step adds variance noise, else 0."""
    timesteps: torch.Tensor
    """(MAX_STAGE_STEPS,) int64 UNet timesteps."""
    guidance: torch.Tensor
    """() float32 guidance weight w."""
    states: torch.Tensor
    """(B, 77, D) T5 states in the UNet's dtype."""
    labels: torch.Tensor | None
    """(B,) int64 noise level (cascade 2)."""
    noise: torch.Tensor
    """(capacity, 1, 3, H, W) float32 variance noise of each step (zeros where the step draws none)."""

    @classmethod
    def allocate(cls, key: PixelGraphKey, states: torch.Tensor, capacity: int, device) -> PixelStepBuffers:
        img = (1, 3, key.height, key.width)
        return cls(
            x=torch.zeros(img, device=device), x0=torch.zeros(img, device=device),
            cond=torch.zeros(img, device=device) if key.cascade == 2 else None,
            step=torch.zeros((), dtype=torch.int64, device=device),
            tables=torch.zeros(len(_ROWS) + 1, MAX_STAGE_STEPS, device=device),
            timesteps=torch.ones(MAX_STAGE_STEPS, dtype=torch.int64, device=device),
            guidance=torch.zeros((), device=device), states=torch.zeros_like(states),
            labels=torch.zeros(key.batch, dtype=torch.int64, device=device) if key.cascade == 2 else None,
            noise=torch.zeros((capacity, *img), device=device),
        )


def pixel_step(nets: IFNetworks, b: PixelStepBuffers, key: PixelGraphKey, sched: dict) -> None:
    """One DDPM step on the buffers, in docs/ALGORITHM.md's notation; every operation is capturable."""
    from .pixel_pipeline import threshold  # pixel_pipeline imports this module

    i = b.step.view(1)
    a_t, b_t, c_x0, c_xt, log_beta, log_beta_tilde, noisy = b.tables.index_select(1, i).unbind(0)  # each (1,)
    t = b.timesteps.index_select(0, i).squeeze(0)
    x = b.x
    x_in = x if b.cond is None else torch.cat([x, b.cond], dim=1)
    cfg = key.batch == 2
    out = nets.unet(key.cascade, torch.cat([x_in, x_in]) if cfg else x_in, t, b.states, b.labels, key.dilation)
    if cfg:
        (eps_u, _), (eps_c, v) = (h.split(3, dim=1) for h in out.chunk(2))
        eps = eps_u + b.guidance * (eps_c - eps_u)
    else:
        eps, v = out[:, :3], out[:, 3:]
    x0 = threshold((x - b_t * eps) / a_t, sched)  # paper Eq. 5
    mean = c_x0 * x0 + c_xt * x
    frac = (v + 1) / 2
    log_var = frac * log_beta + (1 - frac) * log_beta_tilde
    noise = b.noise.index_select(0, i).squeeze(0)
    b.x0.copy_(x0)
    b.x.copy_(mean + noisy * torch.exp(0.5 * log_var) * noise)  # noisy is 1 or 0: exact either way
    b.step.add_(1)


class PixelGraphedDenoiser(GraphedDenoiser):
    """GraphedDenoiser's capture, replay, counters and timing for the pixel step: one graph per PixelGraphKey."""

    def __init__(self, nets: IFNetworks, device, sched: dict[int, dict], capture: bool = True, warmup_steps: int = 2):
        super().__init__(nets, torch.device(device), warmup_steps, capture)
        self.sched = sched
        """Scheduler config by cascade stage (its thresholding is part of the step)."""

    def _capture(self, key: PixelGraphKey, b: PixelStepBuffers) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                pixel_step(self.nets, b, key, self.sched[key.cascade])
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            pixel_step(self.nets, b, key, self.sched[key.cascade])
        self.captures += 1
        return graph

    def run_pixel_stage(self, cascade: int, x: torch.Tensor, cond: torch.Tensor | None, c: DDPMCoefficients,
                        states: torch.Tensor, labels: torch.Tensor | None, w: float, cfg: bool, dilation: int,
                        steps: int, truncate: bool, generator: torch.Generator, noise_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` steps from x; returns (x after the last update, x0 of the last step). With `truncate` the last
        step draws no noise (the eager loop stops before its update; here the update runs and is not used)."""
        if steps > MAX_STAGE_STEPS:
            raise ValueError(f"a stage of {steps} steps exceeds {MAX_STAGE_STEPS}")
        key = PixelGraphKey(cascade, 2 if cfg else 1, x.shape[-2], x.shape[-1], dilation)
        noisy = [c.add_noise[i] and not (truncate and i == steps - 1) for i in range(steps)]
        # Drawn now, on the CPU generator, step by step as the eager loop draws them.
        drawn = [draw_noise(tuple(x.shape), generator, noise_dtype, "cpu") if n else torch.zeros(x.shape)
                 for n in noisy]
        b = self.buffers.get(key)
        if b is None or b.noise.shape[0] < steps:  # a longer stage than the graph was captured for: new buffers
            b = self.buffers[key] = PixelStepBuffers.allocate(key, states, steps, self.device)
            self.graphs.pop(key, None)
        self._load(b, x, cond, c, states, labels, w, steps, noisy, drawn)
        if not self.capture:
            for _ in range(steps):
                pixel_step(self.nets, b, key, self.sched[cascade])
            return b.x.clone(), b.x0.clone()
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(key, b)
            self._load(b, x, cond, c, states, labels, w, steps, noisy, drawn)  # warm-up moved x and the counter
        for _ in range(steps):
            graph.replay()
        self.replays += steps
        return b.x.clone(), b.x0.clone()

    @staticmethod
    def _load(b: PixelStepBuffers, x, cond, c: DDPMCoefficients, states, labels, w: float, steps: int,
              noisy: list[bool], drawn: list[torch.Tensor]) -> None:
        b.x.copy_(x)
        if b.cond is not None:
            b.cond.copy_(cond)
        b.step.zero_()
        for row, name in enumerate(_ROWS):
            b.tables[row, :steps].copy_(getattr(c, name))
        b.tables[len(_ROWS), :steps].copy_(torch.tensor(noisy, dtype=torch.float32))
        b.timesteps[:steps].copy_(c.timesteps)
        b.guidance.fill_(w)
        b.states.copy_(states)
        if b.labels is not None:
            b.labels.copy_(labels)
        b.noise[:steps].copy_(torch.stack(drawn))
