"""Tiled VAE decode and encode with whole-image group-norm statistics (docs/ALGORITHM.md §13).

The full-resolution half of each VAE (the decoder's up blocks and output, the encoder's input and down blocks)
runs tile by tile; the latent-resolution half (the mid block with its global attention, the 1x1 quant convs)
runs whole, as it costs little memory. Each tile carries a halo at least as wide as the receptive field its
convolutions grow, so its core is computed from the same inputs as in the untiled pass. Every GroupNorm is a
meeting point: each tile is a generator that yields the per-group sums of its core, the driver adds them over
all tiles and sends the whole image's mean and 1/std back. The cores are then the untiled result up to float
rounding, and they are laid side by side without blending: there is no seam to hide. A tile's live tensors
sit in its `TileTensors`, so that a waiting tile can be parked in host memory (runtime/vae_parking.py).

Works on the torch `AutoencoderKL` (the same module `TorchNetworks` runs); `TiledVaeNetworks` wraps any
`Networks` and sends the passes larger than one tile here.
"""
from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.networks import WrappedNetworks
from .vae_parking import HostParking, Parking, Resident, TileTensors

DEFAULT_TILE = 2048
"""Tile core side in image pixels: at SDXL's 8192 a decode is 16 tiles whose halos add about a quarter."""

TILE_MULTIPLE = 64
"""Tile cores are multiples of this many pixels (8 latent pixels; the encoder's strides need 8 pixels)."""


class VaeTilingError(ValueError):
    """A tile size or VAE the tiled passes cannot serve; the message names it."""


@dataclass(frozen=True)
class VaeTiling:
    """How the VAE passes are tiled."""

    tile: int = DEFAULT_TILE
    """Tile core side in image pixels, a multiple of 64; a pass no larger than one tile runs untiled."""
    park: bool = False
    """Park waiting tiles in host memory (runtime/vae_parking.py): the device holds about one tile's working set
    instead of the whole image's activations, for host memory and transfers."""

    def __post_init__(self):
        if not (isinstance(self.tile, int) and self.tile >= TILE_MULTIPLE and self.tile % TILE_MULTIPLE == 0):
            raise VaeTilingError(f"VAE tile size {self.tile!r}: must be a multiple of {TILE_MULTIPLE} pixels, "
                                 f"at least {TILE_MULTIPLE}")

    def tiles(self, height: int, width: int) -> bool:
        """Whether an image of this pixel size is cut into more than one tile."""
        return height > self.tile or width > self.tile


# --- one tile ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tile:
    """A tile in the units of the tiled input: the padded window [top, bottom) x [left, right) and its core."""

    top: int
    bottom: int
    left: int
    right: int
    core: tuple[int, int, int, int]
    """(top, bottom, left, right) of the core, in the same units, in image coordinates."""

    def core_of(self, x: torch.Tensor) -> torch.Tensor:
        """The core of a tensor computed from this tile, whatever its resolution (the scale is exact)."""
        h, w = x.shape[-2:]
        sy = h / (self.bottom - self.top)
        sx = w / (self.right - self.left)
        t, b, l, r = self.core
        return x[..., round((t - self.top) * sy):round((b - self.top) * sy),
                 round((l - self.left) * sx):round((r - self.left) * sx)]

    def core_pixels(self, x: torch.Tensor) -> int:
        """How many pixels the core of `x` has."""
        return self.core_of(x).shape[-2:].numel()


def _cuts(n: int, core: int, align: int) -> list[int]:
    """Boundaries splitting [0, n) into near-equal parts of at most about `core`, on multiples of `align`."""
    parts = max(1, math.ceil(n / core))
    return sorted({min(n, round(i * n / parts / align) * align) for i in range(parts)} | {n})


def _tiles(height: int, width: int, core: int, halo: int, align: int) -> list[_Tile]:
    ys, xs = _cuts(height, core, align), _cuts(width, core, align)
    out = []
    for t, b in zip(ys, ys[1:]):
        for l, r in zip(xs, xs[1:]):
            out.append(_Tile(max(0, t - halo), min(height, b + halo), max(0, l - halo), min(width, r + halo),
                             (t, b, l, r)))
    return out


Stats = tuple[torch.Tensor, torch.Tensor]
"""(mean, variance) of the whole image per (batch, channel): each channel carries its group's values."""
TileRun = Generator[tuple[torch.nn.GroupNorm, torch.Tensor, torch.Tensor, int], Stats, torch.Tensor]
"""A tile's forward: yields (norm, core sum, core sum of squares, core pixels) per (batch, channel), float64,
and receives the stats."""


def _core_sums(norm: torch.nn.Module, x: torch.Tensor, tile: _Tile):
    """(norm, core sum, core sum of squares, core pixels) per (batch, channel), float64: what a tile yields."""
    if not isinstance(norm, torch.nn.GroupNorm):
        raise VaeTilingError(f"tiled VAE: {type(norm).__name__} is not a GroupNorm")
    core = tile.core_of(x)
    acc = torch.promote_types(x.dtype, torch.float32)
    s1 = core.sum(dim=(-2, -1), dtype=acc).double()  # (B, C)
    s2 = torch.linalg.vector_norm(core, dim=(-2, -1), dtype=acc).double() ** 2
    return norm, s1, s2, tile.core_pixels(x)


def _normalised(norm: torch.nn.GroupNorm, x: torch.Tensor, stats: Stats) -> torch.Tensor:
    """`x` normalised with the whole image's per-channel mean and variance, by batch norm's inference kernel
    (per-channel statistics given), which reads 16-bit input and accumulates in float32 without a float32 copy."""
    mean, var = stats
    acc = torch.promote_types(x.dtype, torch.float32)
    # Parameters in float32 beside 16-bit input: the mixed-precision case batch norm's kernels take (CPU and CUDA).
    w, b = (None, None) if not norm.affine else (norm.weight.to(acc), norm.bias.to(acc))
    out = [F.batch_norm(x[i:i + 1], mean[i].to(acc), var[i].to(acc), w, b, False, 0.0, norm.eps)
           for i in range(x.shape[0])]  # one sample at a time: batch norm's statistics are per channel only
    return out[0] if len(out) == 1 else torch.cat(out)


# The tile functions below keep every device tensor of a tile in its TileTensors `held` (x, h), never in a
# local that lives across a yield: while the tile waits, the driver may park `held` in host memory, and a
# local would keep the tensor on the device (runtime/vae_parking.py).

def _group_norm(norm: torch.nn.Module, held: TileTensors, tile: _Tile, src: str):
    """held.h = GroupNorm of held.<src> with the whole image's statistics: yields this core's per-channel sums,
    gets the global per-channel mean and variance back."""
    stats = yield _core_sums(norm, getattr(held, src), tile)
    held.h = _normalised(norm, getattr(held, src), stats)


def _resnet(block: torch.nn.Module, held: TileTensors, tile: _Tile):
    """diffusers' ResnetBlock2D without time embedding, up or down sampling (what VAE blocks use), on held.x."""
    if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
        raise VaeTilingError("tiled VAE: a resnet block with resampling or time embedding")
    yield from _group_norm(block.norm1, held, tile, "x")
    if block.conv_shortcut is not None:  # now rather than at the sum: the residual waits with its output channels
        held.x = block.conv_shortcut(held.x)
    held.h = block.conv1(block.nonlinearity(held.h))
    yield from _group_norm(block.norm2, held, tile, "h")
    held.h = block.conv2(block.dropout(block.nonlinearity(held.h)))
    held.x = (held.x + held.h) / block.output_scale_factor
    held.h = None


def _decoder_tile(decoder: torch.nn.Module, held: TileTensors, tile: _Tile) -> TileRun:
    """Up blocks, output norm, activation and conv of one latent tile (after the mid block)."""
    held.x = held.x.contiguous()  # the tile's own copy of its window: parked or not, the same input layout
    for block in decoder.up_blocks:
        for r in block.resnets:
            yield from _resnet(r, held, tile)
        for up in block.upsamplers or ():
            held.x = up(held.x)
    yield from _group_norm(decoder.conv_norm_out, held, tile, "x")
    held.x, held.h = decoder.conv_out(decoder.conv_act(held.h)), None
    return held.x


def _encoder_tile(encoder: torch.nn.Module, held: TileTensors, tile: _Tile) -> TileRun:
    """Input conv and down blocks of one image tile (before the mid block)."""
    held.x = encoder.conv_in(held.x.contiguous())
    for block in encoder.down_blocks:
        for r in block.resnets:
            yield from _resnet(r, held, tile)
        for down in block.downsamplers or ():
            held.x = down(held.x)
    return held.x


# --- the driver -------------------------------------------------------------------------------------------

def _run(runs: list[TileRun], held: list[TileTensors], tiles: list[_Tile], out: torch.Tensor, scale: float,
         parking: Parking) -> torch.Tensor:
    """Steps every tile to its next GroupNorm, parking it there, sends the global statistics, and writes each
    finished core into `out` (whose units are `scale` times the tiles')."""
    replies: list[Stats | None] = [None] * len(runs)
    live = list(range(len(runs)))
    try:
        while live:
            asks, still = [], []
            for i in live:
                parking.unpark(held[i], i)
                try:
                    asks.append(runs[i].send(replies[i]))
                    still.append(i)
                except StopIteration as done:
                    t, b, l, r = (round(v * scale) for v in tiles[i].core)
                    out[..., t:b, l:r] = tiles[i].core_of(done.value)
                    held[i].x = held[i].h = None
                    continue
                parking.park(held[i], i)
            if not still:
                break
            if len(still) != len(live) or len({id(a[0]) for a in asks}) != 1:
                raise VaeTilingError("tiled VAE: tiles reached different layers")  # all walk the same network
            g = asks[0][0].num_groups
            b, c = asks[0][1].shape
            n = sum(a[3] for a in asks) * (c // g)  # values per group
            s1 = sum(a[1] for a in asks).reshape(b, g, -1).sum(-1) / n  # per-group mean, float64
            s2 = sum(a[2] for a in asks).reshape(b, g, -1).sum(-1) / n
            var = (s2 - s1 * s1).clamp_min(0)  # biased, as GroupNorm's
            stats = (s1.repeat_interleave(c // g, dim=1), var.repeat_interleave(c // g, dim=1))
            replies = [stats] * len(runs)
            live = still
    finally:
        parking.close()
    return out


def decoder_halo(decoder: torch.nn.Module) -> int:
    """Latent pixels a tile's core must lie inside its window: each 3x3 conv spoils one pixel of its own
    resolution at a cut edge, which is 1/s latent pixels at scale s; rounded up, plus one to spare."""
    spoil, s = 0.0, 1
    for block in decoder.up_blocks:
        spoil += 2 * len(block.resnets) / s
        if block.upsamplers:
            s *= 2
            spoil += 1 / s
    return math.ceil(spoil + 1 / s) + 1


def encoder_halo(encoder: torch.nn.Module, vae_scale: int) -> int:
    """Image pixels of halo for the down path: a 3x3 conv at scale s spoils s pixels, a stride-2 conv 2s;
    rounded up to the VAE scale so that every tile keeps the strides' grid, plus one latent pixel."""
    spoil, s = 1.0, 1  # conv_in
    for block in encoder.down_blocks:
        spoil += 2 * len(block.resnets) * s
        if block.downsamplers:
            spoil += 2 * s
            s *= 2
    return math.ceil(spoil / vae_scale) * vae_scale + vae_scale


def tiled_decode(vae: torch.nn.Module, latents: torch.Tensor, tile: int = DEFAULT_TILE,
                 parking: Parking | None = None) -> torch.Tensor:
    """`vae.decode(latents).sample`, the up path in tiles of `tile` pixels (a multiple of 64); waiting tiles
    kept by `parking` (default: on the device)."""
    VaeTiling(tile)
    dec = vae.decoder
    f = 2 ** sum(1 for b in dec.up_blocks if b.upsamplers)
    with torch.inference_mode():
        z = vae.post_quant_conv(latents) if vae.post_quant_conv is not None else latents
        x = dec.mid_block(dec.conv_in(z), None)
        h, w = x.shape[-2:]
        tiles = _tiles(h, w, tile // f, decoder_halo(dec), 1)
        out = x.new_empty(x.shape[0], dec.conv_out.out_channels, h * f, w * f)
        held = [TileTensors(x[..., t.top:t.bottom, t.left:t.right]) for t in tiles]
        del x  # the tiles' windows keep it until each has copied its own
        runs = [_decoder_tile(dec, k, t) for k, t in zip(held, tiles)]
        return _run(runs, held, tiles, out, f, parking or Resident())


def tiled_encode(vae: torch.nn.Module, images: torch.Tensor, tile: int = DEFAULT_TILE,
                 parking: Parking | None = None) -> torch.Tensor:
    """`vae.encode(images).latent_dist.mean`, the down path in tiles of `tile` pixels (a multiple of 64); waiting
    tiles kept by `parking` (default: on the device)."""
    VaeTiling(tile)
    enc = vae.encoder
    f = 2 ** sum(1 for b in enc.down_blocks if b.downsamplers)
    h, w = images.shape[-2:]
    if h % f or w % f:
        raise VaeTilingError(f"tiled VAE encode: image {w}x{h} is not a multiple of {f} pixels")
    with torch.inference_mode():
        tiles = _tiles(h, w, tile, encoder_halo(enc, f), f)
        c = enc.down_blocks[-1].resnets[-1].conv2.out_channels
        x = images.new_empty(images.shape[0], c, h // f, w // f)
        held = [TileTensors(images[..., t.top:t.bottom, t.left:t.right]) for t in tiles]
        runs = [_encoder_tile(enc, k, t) for k, t in zip(held, tiles)]
        x = _run(runs, held, tiles, x, 1 / f, parking or Resident())
        x = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(x))))
        moments = vae.quant_conv(x) if vae.quant_conv is not None else x
        return moments.chunk(2, dim=1)[0]  # the posterior's mean, as DiagonalGaussianDistribution splits it


class TiledVaeNetworks(WrappedNetworks):
    """Any `Networks` whose VAE passes larger than one tile run tiled on the torch VAE `vae` (the UNet, text
    encoders and small passes go to the wrapped networks unchanged). Like `TorchNetworks`: float32 in and out,
    the VAE in its own dtype inside."""

    def __init__(self, base, vae: torch.nn.Module, tiling: VaeTiling):
        super().__init__(base)
        self.vae, self.tiling = vae, tiling

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        h, w = latents.shape[-2:]
        f = 2 ** sum(1 for b in self.vae.decoder.up_blocks if b.upsamplers)
        if not self.tiling.tiles(h * f, w * f):
            return self.base.vae_decode(latents)
        return tiled_decode(self.vae, latents.to(self.vae.dtype), self.tiling.tile, self._parking(latents)).float()

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        if not self.tiling.tiles(*images.shape[-2:]):
            return self.base.vae_encode(images)
        return tiled_encode(self.vae, images.to(self.vae.dtype), self.tiling.tile, self._parking(images)).float()

    def _parking(self, x: torch.Tensor) -> Parking | None:
        return HostParking(x.device) if self.tiling.park else None
