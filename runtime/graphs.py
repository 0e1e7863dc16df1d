"""CUDA-graphed denoise steps: one graph per stage shape serves every step of that stage.

The captured step is the whole step of docs/ALGORITHM.md §6: UNet on the CFG batch, the guidance combine, x0 and the
DDIM update. Its timestep and coefficients are gathered from device tables by a device step counter that the
graph itself advances, so a stage is `reset` (copy its tables in, counter to 0) and then `steps` replays.
Buffers live in `StepBuffers`, allocated once per key outside the graph wrapper; graphs share one memory pool.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..engine.networks import Networks

from .conditioning import Conditioning
from .schedule import StageCoefficients

MAX_STAGE_STEPS = 1000
"""Capacity of the device coefficient tables (DDIM over 1000 training steps)."""


class NotCapturableError(ValueError):
    """Networks that declare they cannot be captured were given to a capturing GraphedDenoiser."""


@dataclass(frozen=True)
class GraphKey:
    """What a captured step depends on: one graph per distinct key."""

    batch: int
    """UNet batch (2 with classifier-free guidance)."""
    latent_h: int
    """Latent height."""
    latent_w: int
    """Latent width."""
    dilation: int
    """Mid-block dilation (1: standard UNet, else the dilated variant)."""
    images: int = 1
    """Latents denoised together (runtime/batch.py); the UNet batch is 2 x images under CFG, else images."""


@dataclass
class StepBuffers:
    """Static inputs and outputs of a captured step; the graph reads and writes only these."""

    z: torch.Tensor
    """(images, 4, h, w) float32 latent, updated in place by each replay."""
    x0: torch.Tensor
    """(images, 4, h, w) float32 predicted clean latent of the last replayed step (the truncation x0)."""
    step: torch.Tensor
    """() int64 device step counter, advanced by each replay."""
    tables: torch.Tensor
    """(4, MAX_STAGE_STEPS) float32: sqrt(abar'_t), sqrt(1-abar'_t), sqrt(abar'_s), sqrt(1-abar'_s)."""
    timesteps: torch.Tensor
    """(MAX_STAGE_STEPS,) int64 UNet timesteps."""
    guidance: torch.Tensor
    """() float32 guidance weight w."""
    hidden_states: torch.Tensor
    """(B, 77, D) encoder hidden states."""
    pooled: torch.Tensor | None
    """(B, P) pooled text embedding (SDXL) or None."""
    time_ids: torch.Tensor | None
    """(B, 6) SDXL time ids or None."""

    @classmethod
    def allocate(cls, key: GraphKey, cond: Conditioning, device) -> StepBuffers:
        lat = (key.images, 4, key.latent_h, key.latent_w)
        return cls(
            z=torch.zeros(lat, device=device),
            x0=torch.zeros(lat, device=device),
            step=torch.zeros((), dtype=torch.int64, device=device),
            tables=torch.zeros(4, MAX_STAGE_STEPS, device=device),
            timesteps=torch.ones(MAX_STAGE_STEPS, dtype=torch.int64, device=device),
            guidance=torch.zeros((), device=device),
            hidden_states=torch.zeros_like(cond.hidden_states),
            pooled=None if cond.pooled is None else torch.zeros_like(cond.pooled),
            time_ids=None if cond.pooled is None else torch.zeros(cond.batch, 6, device=device),
        )


def _step(nets: Networks, b: StepBuffers, cfg: bool, dilation: int) -> None:
    """One denoise step on the buffers, in docs/ALGORITHM.md's notation; every operation is capturable."""
    i = b.step.view(1)
    a_t, b_t, a_s, b_s = b.tables.index_select(1, i).unbind(0)  # each (1,)
    t = b.timesteps.index_select(0, i).squeeze(0)
    z = b.z
    sample = torch.cat([z, z]) if cfg else z
    eps = nets.unet(sample, t, b.hidden_states, b.pooled, b.time_ids, dilation)
    if cfg:
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + b.guidance * (eps_c - eps_u)
    x0 = (z - b_t * eps) / a_t
    b.x0.copy_(x0)
    b.z.copy_(a_s * x0 + b_s * eps)
    b.step.add_(1)


@dataclass
class GraphedDenoiser:
    """Captures one step graph per `GraphKey` on first use and replays it; counts both for tests."""

    nets: Networks
    """The backend whose UNet is captured (torch modules, or any engine that can be captured)."""
    device: torch.device
    """CUDA device the graphs live on."""
    warmup_steps: int = 2
    """Eager steps on a side stream before capture (lets lazy initialisation and autotuning happen)."""
    capture: bool = True
    """False runs the same buffered step eagerly (CPU, or a backend that cannot be captured)."""
    captures: int = 0
    """Graphs captured so far."""
    replays: int = 0
    """Graph replays so far."""
    capture_seconds: float = 0.0
    """Wall time of the captures so far, their warm-up steps included (a first generation's extra cost)."""
    graphs: dict[GraphKey, torch.cuda.CUDAGraph] = field(default_factory=dict)
    buffers: dict[GraphKey, StepBuffers] = field(default_factory=dict)
    pool: object = None

    def __post_init__(self):
        if self.capture and not self.nets.capturable:
            raise NotCapturableError(f"{type(self.nets).__name__} cannot run inside a CUDA graph capture "
                                     f"(it declares capturable = False); run the stages eagerly instead")

    def replay_timing(self, key: GraphKey, repeats: int = 10) -> tuple[float, float]:
        """(median GPU ms of one replay, host ms to launch one replay on an idle GPU), for overhead reports.

        Replays run on the key's buffers after a generation, so they leave its latent changed.
        """
        graph = self.graphs[key]
        b = self.buffers[key]
        gpu, host = [], []
        for _ in range(repeats):
            b.step.zero_()
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            graph.replay()
            host.append(time.perf_counter() - t0)
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end))
        return sorted(gpu)[len(gpu) // 2], 1000 * sorted(host)[len(host) // 2]

    def _capture(self, key: GraphKey, b: StepBuffers) -> torch.cuda.CUDAGraph:
        t0 = time.perf_counter()
        cfg = key.batch == 2 * key.images
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                _step(self.nets, b, cfg, key.dilation)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            _step(self.nets, b, cfg, key.dilation)
        self.captures += 1
        torch.cuda.current_stream(self.device).synchronize()  # the warm-up steps ran: timed whole, once per key
        self.capture_seconds += time.perf_counter() - t0
        return graph

    def run_stage(self, z: torch.Tensor, c: StageCoefficients, cond: Conditioning, time_ids: torch.Tensor | None,
                  dilation: int, guidance: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs `steps` steps from latent z; returns (z after the last update, x0 of the last step)."""
        if steps > MAX_STAGE_STEPS:
            raise ValueError(f"a stage of {steps} steps exceeds {MAX_STAGE_STEPS}")
        key = GraphKey(cond.batch, z.shape[-2], z.shape[-1], dilation, z.shape[0])
        b = self.buffers.get(key)
        if b is None:
            b = self.buffers[key] = StepBuffers.allocate(key, cond, self.device)
        self._load(b, z, c, cond, time_ids, guidance, steps)
        if not self.capture:
            for _ in range(steps):
                _step(self.nets, b, cond.cfg, dilation)
            return b.z.clone(), b.x0.clone()
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(key, b)
            self._load(b, z, c, cond, time_ids, guidance, steps)  # warm-up moved z and the counter
        for _ in range(steps):
            graph.replay()
        self.replays += steps
        return b.z.clone(), b.x0.clone()

    def release(self) -> None:
        """Drops the graphs, their buffers and the pool they share. A one-shot run (one image a process) replays no
        stage's graph again, and the pool's memory, which nothing outside the graphs can use while they live, then
        serves the relay and the decode.

        The device is synchronized first: the pool's memory was allocated on the capture stream but the graphs
        replay on the current one, and with expandable segments PyTorch unmaps a freed segment after waiting for
        its allocation stream only, so replays still in flight read unmapped pages (H200, SDXL 2048 from
        --weights-apart packages under expandable segments: without it the first run died with an illegal memory
        access; with it 3 runs of 3 passed)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self.buffers.clear()
        self.pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @staticmethod
    def _load(b: StepBuffers, z, c: StageCoefficients, cond: Conditioning, time_ids, guidance: float, steps: int):
        b.z.copy_(z)
        b.step.zero_()
        for row, src in enumerate((c.sqrt_abar_t, c.sqrt_one_minus_abar_t, c.sqrt_abar_s, c.sqrt_one_minus_abar_s)):
            b.tables[row, :steps].copy_(src)
        b.timesteps[:steps].copy_(c.timesteps)
        b.guidance.fill_(guidance)
        b.hidden_states.copy_(cond.hidden_states)
        if b.pooled is not None:
            b.pooled.copy_(cond.pooled)
            b.time_ids.copy_(time_ids)
