"""Parking for the tiled VAE (docs/ALGORITHM.md §13): while a tile waits at a GroupNorm for the others, its live
tensors wait in host memory, so the device holds one tile's working set at a time instead of the whole image's.

A tile's live tensors are exactly those in its `TileTensors` (runtime/vae_tiling.py keeps nothing else on the
device across a meeting). The driver parks them after the tile yields and unparks them before it resumes.
Parking copies, so the values, and the result, are those of the unparked pass bit for bit.
"""
from __future__ import annotations

import torch


class TileTensors:
    """A tile's live tensors between two GroupNorm meetings: `x`, the running activation (a resnet's residual
    input), and `h`, the resnet's inner activation (None outside a resnet)."""

    __slots__ = ("x", "h")
    NAMES = ("x", "h")

    def __init__(self, x: torch.Tensor):
        self.x, self.h = x, None


class Resident:
    """No parking: every waiting tile keeps its tensors on the device (the whole image's activations)."""

    def park(self, held: TileTensors, slot: int) -> None:
        pass

    def unpark(self, held: TileTensors, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


def _layout(held: TileTensors) -> list[tuple[str, int, int]]:
    """(name, byte offset, bytes) of each tensor `held` has, packed into one buffer (offsets 64-byte aligned)."""
    out, at = [], 0
    for name in held.NAMES:
        t = getattr(held, name)
        if isinstance(t, torch.Tensor):
            n = t.numel() * t.element_size()
            out.append((name, at, n))
            at += -(-n // 64) * 64
    return out


def _register(buf: torch.Tensor) -> bool:
    """Page-locks a host buffer for CUDA's asynchronous copies; False where that fails (the buffer still works)."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)) == 0  # cudaSuccess
    except (AttributeError, RuntimeError):
        return False


class HostParking:
    """Parks into host buffers, one per tile, kept for the whole pass and grown when a meeting needs more (a
    pass allocates a few buffers per tile, not one per meeting). On CUDA the buffers are page-locked with
    cudaHostRegister and the copies are asynchronous on the current stream, which orders every copy before the
    kernels that read its result; registering exact sizes avoids the pinned caching allocator, which rounds
    every block up to a power of two and keeps it for the rest of the process. Where registering fails the
    buffers stay pageable: slower copies, the same values."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self._buffers: dict[int, torch.Tensor] = {}
        self._registered: set[int] = set()
        self._parked: dict[int, list[str]] = {}

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            if buf is not None:
                self._free(buf)
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            if self.pin and _register(buf):
                self._registered.add(buf.data_ptr())
            self._buffers[slot] = buf
        return buf

    def _free(self, buf: torch.Tensor) -> None:
        if buf.data_ptr() in self._registered:
            torch.cuda.current_stream(self.device).synchronize()  # no copy may still read or write it
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
            self._registered.discard(buf.data_ptr())

    def park(self, held: TileTensors, slot: int) -> None:
        layout = _layout(held)
        if not layout:
            return
        buf = self._buffer(slot, layout[-1][1] + layout[-1][2])
        for name, at, n in layout:
            t = getattr(held, name)
            host = buf[at:at + n].view(t.dtype).view(t.shape)
            host.copy_(t, non_blocking=True)
            setattr(held, name, host)  # the device tensor's last reference goes: its memory returns to the pool
        self._parked[slot] = [name for name, _, _ in layout]

    def unpark(self, held: TileTensors, slot: int) -> None:
        for name in self._parked.pop(slot, ()):
            t = getattr(held, name)
            # A fresh device tensor even when the device is the CPU: the buffer is written again next park.
            setattr(held, name, torch.empty(t.shape, dtype=t.dtype, device=self.device).copy_(t, non_blocking=True))

    def close(self) -> None:
        for buf in self._buffers.values():
            self._free(buf)
        self._buffers.clear()
        self._parked.clear()


class ShapeParking:
    """Parking on the meta device, for the memory estimate (core/memory.py counts what lives on the device): a
    parked tensor leaves the device and only its shape is kept; unparking allocates it anew. Counts the host
    bytes HostParking's buffers would take (at most, over the pass: `host_peak`)."""

    def __init__(self):
        self.host = self.host_peak = 0
        self._buffers: dict[int, int] = {}

    def park(self, held: TileTensors, slot: int) -> None:
        layout = _layout(held)
        if not layout:
            return
        old = self._buffers.get(slot, 0)  # one buffer per tile, grown as HostParking grows it
        new = max(old, layout[-1][1] + layout[-1][2])
        self.host += new - old
        self.host_peak = max(self.host_peak, self.host)
        self._buffers[slot] = new
        for name, _, _ in layout:
            t = getattr(held, name)
            setattr(held, name, (tuple(t.shape), t.dtype, t.device))

    def unpark(self, held: TileTensors, slot: int) -> None:
        for name in held.NAMES:
            t = getattr(held, name)
            if isinstance(t, tuple):
                shape, dtype, device = t
                setattr(held, name, torch.empty(shape, dtype=dtype, device=device))

    def close(self) -> None:
        self.host = 0
        self._buffers.clear()


Parking = Resident | HostParking | ShapeParking
"""How waiting tiles are kept: each has park(held, slot), unpark(held, slot) and close() (end of the pass)."""
