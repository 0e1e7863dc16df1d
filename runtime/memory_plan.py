"""The memory plan (docs/ALGORITHM.md §13): each segment's peak estimated before anything loads (core/memory.py),
and the VAE tiling chosen from it: untiled while the estimate fits the budget, tiled when it does not (or when
asked), refused with the estimate named when even the tiled plan does not fit.

The UNet's attention is counted as a fused kernel (flash, memory-efficient or cuDNN SDPA: what torch picks on
CUDA for 16-bit inputs), which keeps no N x N score matrix; at 65,536 tokens and more such a matrix would be
tens of GiB, so a run that falls back to the math kernel is outside this estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.families import ModelFamily
from ..core.memory import GiB, MemoryEstimate, VaePasses, estimate_memory
from ..core.plan import StagePlan
from .vae_tiling import DEFAULT_TILE, VaeTiling, tiled_decode, tiled_encode


def tiled_passes(tiling: VaeTiling) -> VaePasses:
    """The VAE passes as TiledVaeNetworks runs them: tiled above one tile, untiled below."""
    untiled = VaePasses()

    def decode(vae, lat):
        h, w = lat.shape[-2:]
        f = 2 ** sum(1 for b in vae.decoder.up_blocks if b.upsamplers)
        return tiled_decode(vae, lat, tiling.tile) if tiling.tiles(h * f, w * f) else untiled.decode(vae, lat)

    def encode(vae, img):
        return tiled_encode(vae, img, tiling.tile) if tiling.tiles(*img.shape[-2:]) else untiled.encode(vae, img)

    return VaePasses(decode, encode, lambda h, w: f" (tiled {tiling.tile})" if tiling.tiles(h, w) else "")


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate that will run and the VAE tiling it chose."""

    estimate: MemoryEstimate
    """Of the plan as it will run (tiled if `tiling`)."""
    tiling: VaeTiling | None
    """None: the VAE runs untiled."""
    limit_bytes: int
    """The budget."""
    why: str
    """Why this tiling, in words."""
    untiled_peak_bytes: int
    """The untiled estimate's peak, for comparison."""

    @property
    def fits(self) -> bool:
        return self.estimate.peak_bytes <= self.limit_bytes

    def describe(self) -> list[str]:
        tiling = f"tiled, {self.tiling.tile}-pixel tiles" if self.tiling else "untiled"
        return [*self.estimate.describe(), f"VAE {tiling}: {self.why}"]


def plan_memory(family: ModelFamily, plan: StagePlan, unet_dtype: torch.dtype, vae_dtype: torch.dtype,
                limit_bytes: int, cfg: bool = True, relay: str = "pixel", when: str = "auto",
                tiling: VaeTiling | None = None, graph_pool: bool = False) -> MemoryPlan:
    """`when`: "auto" (tile only when the untiled estimate exceeds `limit_bytes`), "on" or "off";
    `tiling`: the tile size to use (default DEFAULT_TILE)."""
    if when not in ("auto", "on", "off"):
        raise ValueError(f"VAE tiling {when!r}: choose auto, on or off")
    untiled = estimate_memory(family, plan, unet_dtype, vae_dtype, cfg, relay, graph_pool=graph_pool)
    if when == "off" or (when == "auto" and untiled.peak_bytes <= limit_bytes):
        why = "fits the budget" if when == "auto" else "tiling off"
        return MemoryPlan(untiled, None, limit_bytes, why, untiled.peak_bytes)
    tiling = tiling or VaeTiling(DEFAULT_TILE)
    tiled = estimate_memory(family, plan, unet_dtype, vae_dtype, cfg, relay, tiled_passes(tiling), graph_pool)
    if when == "auto" and tiled.peak_bytes >= untiled.peak_bytes:  # small tiles: the halos cost more than they save
        why = f"tiles of {tiling.tile} pixels would not lower the peak ({tiled.peak_bytes / GiB:.2f} GiB tiled)"
        return MemoryPlan(untiled, None, limit_bytes, why, untiled.peak_bytes)
    why = (f"the untiled estimate, {untiled.peak_bytes / GiB:.2f} GiB, exceeds the budget" if when == "auto"
           else f"asked for (untiled estimate {untiled.peak_bytes / GiB:.2f} GiB)")
    return MemoryPlan(tiled, tiling, limit_bytes, why, untiled.peak_bytes)
