"""CUDA-graphed flow-matching steps of SD3 and FLUX (docs/ALGORITHM.md §18), one graph per `FlowGraphKey`.

The captured step is the whole step of `FlowMegaFusionPipeline`'s loop: the transformer on the CFG batch (SD3) or
its one pass with the guidance embedding (FLUX), the guidance combine, x0 = z - sigma_t v and the Euler update
z + (sigma_s - sigma_t) v with the latent's round trip through the model dtype. As in runtime/graphs.py, the step's
sigma and timestep are gathered from device tables by a device step counter the graph advances; the guidance w is
a device scalar, so neither it nor the prompt is baked into a graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.flow_networks import FlowTorchNetworks
from .flow_conditioning import FlowConditioning
from .graphs import MAX_STAGE_STEPS, GraphedDenoiser


@dataclass(frozen=True)
class FlowGraphKey:
    """What a captured flow step depends on: one graph per distinct key."""

    batch: int
    """Transformer batch (2 with SD3's classifier-free guidance, else 1)."""
    latent_h: int
    """Latent height (the token grid is latent_h / patch x latent_w / patch)."""
    latent_w: int
    """Latent width."""
    cfg: bool
    """Whether the batch is [negative, prompt] and the step combines it (SD3 with w > 1)."""
    images: int = 1
    """Latents denoised together (GraphedDenoiser.replay_timing reads it); always 1 here."""


@dataclass
class FlowStepBuffers:
    """Static inputs and outputs of a captured flow step; the graph reads and writes only these."""

    z: torch.Tensor
    """(1, C, h, w) float32 latent, updated in place by each replay."""
    x0: torch.Tensor
    """(1, C, h, w) float32 x0 of the last replayed step (the truncation x0)."""
    step: torch.Tensor
    """() int64 device step counter, advanced by each replay."""
    tables: torch.Tensor
    """(3, MAX_STAGE_STEPS) float32: sigma_t, sigma_s - sigma_t, timestep = 1000 sigma_t."""
    guidance: torch.Tensor
    """() float32 w: SD3's CFG weight, FLUX's guidance embedding value."""
    states: torch.Tensor
    """(B, L, D) float32 encoder hidden states."""
    pooled: torch.Tensor
    """(B, P) float32 pooled text embedding."""
    first: torch.Tensor | None = None
    """() int64 global index of the stage's first step; first + step is what `takes_step` networks read."""

    @classmethod
    def allocate(cls, z: torch.Tensor, cond: FlowConditioning, device) -> FlowStepBuffers:
        return cls(
            z=torch.zeros(z.shape, device=device), x0=torch.zeros(z.shape, device=device),
            step=torch.zeros((), dtype=torch.int64, device=device),
            tables=torch.zeros(3, MAX_STAGE_STEPS, device=device),
            guidance=torch.zeros((), device=device),
            states=torch.zeros(cond.states.shape, device=device), pooled=torch.zeros(cond.pooled.shape, device=device),
            first=torch.zeros((), dtype=torch.int64, device=device),
        )


def flow_step(nets: FlowTorchNetworks, b: FlowStepBuffers, cfg: bool, latent_dtype: torch.dtype) -> None:
    """One flow step on the buffers, in docs/ALGORITHM.md §18's notation; every operation is capturable."""
    i = b.step.view(1)
    sigma_t, d_sigma, timestep = b.tables.index_select(1, i).unbind(0)  # each (1,)
    z = b.z
    sample = torch.cat([z, z]) if cfg else z
    kw = {"step": b.first + b.step} if getattr(nets, "takes_step", False) else {}  # ControlNets' global step
    v = nets.velocity(sample, timestep.expand(sample.shape[0]), b.states, b.pooled, b.guidance, **kw)
    if cfg:
        v_u, v_c = v.chunk(2)
        v = v_u + b.guidance * (v_c - v_u)
    b.x0.copy_(z - sigma_t * v)
    b.z.copy_((z + d_sigma * v).to(latent_dtype))  # Euler; the latent round-trips through the model dtype
    b.step.add_(1)


class FlowGraphedDenoiser(GraphedDenoiser):
    """GraphedDenoiser's capture, replay, counters and timing for the flow step: one graph per FlowGraphKey."""

    def __init__(self, nets: FlowTorchNetworks, device, latent_dtype: torch.dtype, capture: bool = True,
                 warmup_steps: int = 2):
        super().__init__(nets, torch.device(device), warmup_steps, capture)
        self.latent_dtype = latent_dtype
        """The dtype the eager loop keeps its latent in between steps (the transformer's)."""

    def _capture(self, key: FlowGraphKey, b: FlowStepBuffers) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                flow_step(self.nets, b, key.cfg, self.latent_dtype)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            flow_step(self.nets, b, key.cfg, self.latent_dtype)
        self.captures += 1
        return graph

    def run_flow_stage(self, z: torch.Tensor, sigma_t: torch.Tensor, d_sigma: torch.Tensor, timestep: torch.Tensor,
                       cond: FlowConditioning, w: float, steps: int,
                       first_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`steps` steps from z; returns (z after the last update, x0 of the last step). A truncated stage's last
        update runs too and is not used (the eager loop stops before it). `first_step`: the global index of the
        stage's first step (read by networks that take it)."""
        if steps > MAX_STAGE_STEPS:
            raise ValueError(f"a stage of {steps} steps exceeds {MAX_STAGE_STEPS}")
        key = FlowGraphKey(cond.states.shape[0], z.shape[-2], z.shape[-1], cond.cfg)
        b = self.buffers.get(key)
        if b is None or b.states.shape != cond.states.shape:
            b = self.buffers[key] = FlowStepBuffers.allocate(z, cond, self.device)
            self.graphs.pop(key, None)
        self._load(b, z, sigma_t, d_sigma, timestep, cond, w, steps, first_step)
        if not self.capture:
            for _ in range(steps):
                flow_step(self.nets, b, key.cfg, self.latent_dtype)
            return b.z.clone(), b.x0.clone()
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(key, b)
            self._load(b, z, sigma_t, d_sigma, timestep, cond, w, steps, first_step)  # warm-up moved z, counter
        for _ in range(steps):
            graph.replay()
        self.replays += steps
        return b.z.clone(), b.x0.clone()

    @staticmethod
    def _load(b: FlowStepBuffers, z, sigma_t, d_sigma, timestep, cond: FlowConditioning, w: float, steps: int,
              first_step: int = 0):
        b.z.copy_(z)
        b.step.zero_()
        b.first.fill_(first_step)
        for row, src in enumerate((sigma_t, d_sigma, timestep)):
            b.tables[row, :steps].copy_(src[:steps])
        b.guidance.fill_(w)
        b.states.copy_(cond.states)
        b.pooled.copy_(cond.pooled)
