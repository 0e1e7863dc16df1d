"""The memory plan (docs/ALGORITHM.md §13): each segment's peak estimated before anything loads (core/memory.py),
and the VAE tiling chosen from it: untiled while the estimate fits the budget, tiled when it does not (or when
asked), tiled with the waiting tiles parked in host memory when even the tiled estimate does not fit (or when
asked), refused with the estimate named when even that does not fit.

The UNet's attention is counted as a fused kernel (flash, memory-efficient or cuDNN SDPA: what torch picks on
CUDA for 16-bit inputs), which keeps no N x N score matrix; at 65,536 tokens and more such a matrix would be
tens of GiB, so a run that falls back to the math kernel is outside this estimate.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..core.families import ModelFamily
from ..core.memory import GiB, MemoryEstimate, VaePasses, estimate_memory
from ..core.plan import StagePlan
from .memory_cache import EstimateCache, estimate_key
from .vae_parking import ShapeParking
from .vae_tiling import DEFAULT_TILE, VaeTiling, tiled_decode, tiled_encode

MODES = ("auto", "on", "park", "off")
"""VAE tiling: auto (chosen by the budget), on (tiled), park (tiled, waiting tiles in host memory), off."""


def tiled_passes(tiling: VaeTiling) -> VaePasses:
    """The VAE passes as TiledVaeNetworks runs them: tiled above one tile, untiled below; parked tiles (meta
    device only, as core/memory.py runs them) leave the device and are counted as host memory."""
    untiled = VaePasses()
    host = [0]  # the largest pass's parked bytes

    def parking():
        return ShapeParking() if tiling.park else None

    def counted(run, vae, x):
        p = parking()
        try:
            return run(vae, x, tiling.tile, p)
        finally:
            host[0] = max(host[0], p.host_peak if p else 0)

    def decode(vae, lat):
        h, w = lat.shape[-2:]
        f = 2 ** sum(1 for b in vae.decoder.up_blocks if b.upsamplers)
        return counted(tiled_decode, vae, lat) if tiling.tiles(h * f, w * f) else untiled.decode(vae, lat)

    def encode(vae, img):
        return counted(tiled_encode, vae, img) if tiling.tiles(*img.shape[-2:]) else untiled.encode(vae, img)

    suffix = f" (tiled {tiling.tile}{', parked' if tiling.park else ''})"
    return VaePasses(decode, encode, lambda h, w: suffix if tiling.tiles(h, w) else "", lambda: host[0])


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
        if self.tiling and self.tiling.park:
            tiling += f", parked in host memory ({self.estimate.host_bytes / GiB:.2f} GiB)"
        return [*self.estimate.describe(), f"VAE {tiling}: {self.why}"]


def plan_memory(family: ModelFamily, plan: StagePlan, unet_dtype: torch.dtype, vae_dtype: torch.dtype,
                limit_bytes: int, cfg: bool = True, relay: str = "pixel", when: str = "auto",
                tiling: VaeTiling | None = None, graph_pool: bool = False,
                cache: EstimateCache | None = None) -> MemoryPlan:
    """`when`: one of MODES ("auto": the first of untiled, tiled, tiled and parked whose estimate fits
    `limit_bytes`, else the lowest, to be refused); `tiling`: the tile size to use (default DEFAULT_TILE);
    `cache`: estimates kept between starts (runtime/memory_cache.py), else each is computed."""
    if when not in MODES:
        raise ValueError(f"VAE tiling {when!r}: choose {', '.join(MODES)}")

    def estimate(t: VaeTiling | None) -> MemoryEstimate:
        def compute() -> MemoryEstimate:
            return estimate_memory(family, plan, unet_dtype, vae_dtype, cfg, relay, t and tiled_passes(t), graph_pool)

        if cache is None:
            return compute()
        return cache.estimate(estimate_key(family, plan, unet_dtype, vae_dtype, cfg, relay, t, graph_pool), compute)

    untiled = estimate(None)
    if when == "off" or (when == "auto" and untiled.peak_bytes <= limit_bytes):
        why = "fits the budget" if when == "auto" else "tiling off"
        return MemoryPlan(untiled, None, limit_bytes, why, untiled.peak_bytes)
    tiling = tiling or VaeTiling(DEFAULT_TILE)
    if when != "auto":  # "on" keeps the given tiling's parking
        tiling = replace(tiling, park=True) if when == "park" else tiling
        why = f"asked for (untiled estimate {untiled.peak_bytes / GiB:.2f} GiB)"
        return MemoryPlan(estimate(tiling), tiling, limit_bytes, why, untiled.peak_bytes)
    tiling = replace(tiling, park=False)
    tiled = estimate(tiling)
    if tiled.peak_bytes <= limit_bytes:
        why = f"the untiled estimate, {untiled.peak_bytes / GiB:.2f} GiB, exceeds the budget"
        return MemoryPlan(tiled, tiling, limit_bytes, why, untiled.peak_bytes)
    parking = replace(tiling, park=True)
    parked = estimate(parking)
    if parked.peak_bytes <= limit_bytes:
        why = (f"the untiled and tiled estimates, {untiled.peak_bytes / GiB:.2f} and {tiled.peak_bytes / GiB:.2f} "
               "GiB, exceed the budget")
        return MemoryPlan(parked, parking, limit_bytes, why, untiled.peak_bytes)
    # Nothing fits: the lowest, which the caller refuses naming its estimate (no transfers where they gain nothing).
    least = min((untiled.peak_bytes, 0, None, untiled), (tiled.peak_bytes, 1, tiling, tiled),
                (parked.peak_bytes, 2, parking, parked), key=lambda c: c[:2])
    if least[2] is None:  # small tiles: the halos cost more than they save
        why = f"tiles of {tiling.tile} pixels would not lower the peak ({tiled.peak_bytes / GiB:.2f} GiB tiled)"
    else:
        why = "no choice fits the budget; this one has the lowest estimate"
    return MemoryPlan(least[3], least[2], limit_bytes, why, untiled.peak_bytes)
