"""The clock every stage loop keeps: each segment (text encoders, a stage, a relay, the decode) is timed as it
ends, after the device has finished its work, and reported to the caller's `on_segment` at once."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


class SegmentClock:
    """`mark(name)` closes the segment running since the last mark (or since the clock was made)."""

    def __init__(self, device: torch.device, on_segment: Callable[[str, float], None] | None = None):
        self.device = torch.device(device)
        self.on_segment = on_segment
        self.timings: list[tuple[str, float]] = []
        """(segment, seconds) in the order they ended."""
        self.peaks: dict[str, tuple[int, str]] = {}
        """CUDA: 'allocated' and 'reserved' -> (peak bytes, the segment in which it was reached), so a report can say
        where the generation's memory peak is (the stages' graph pool, a relay, the decode)."""
        self.reserved_peak_start: tuple[int, int] | None = None
        """CUDA: (allocated, reserved) bytes when the segment holding the reserved peak began: whether that segment
        itself opened the gap between reserved and allocated at the peak, or found it."""
        self._start = (0, 0)
        if self.device.type == "cuda":  # the generation's own peak (GenerationResult.peak_memory_bytes)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = self._now()
        self._t0 = time.perf_counter()

    def _now(self) -> tuple[int, int]:
        return torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device)

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for kind, peak in (("allocated", torch.cuda.max_memory_allocated(self.device)),
                               ("reserved", torch.cuda.max_memory_reserved(self.device))):
                if peak > self.peaks.get(kind, (-1, ""))[0]:
                    self.peaks[kind] = (peak, name)
                    if kind == "reserved":
                        self.reserved_peak_start = self._start
            self._start = self._now()
        now = time.perf_counter()
        self.timings.append((name, now - self._t0))
        if self.on_segment is not None:
            self.on_segment(name, now - self._t0)
        self._t0 = now

    def peak_memory(self) -> int | None:
        """Peak device memory allocated since the clock was made (CUDA only)."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def peak_detail(self) -> str:
        """Where the peaks were reached, e.g. 'allocated peak in decode; reserved 15.20 GiB, peak in stage 2 (...),
        which began at 6.10 GiB allocated, 6.30 GiB reserved' ('' off CUDA)."""
        if not self.peaks:
            return ""
        (_, a_seg), (r, r_seg) = self.peaks["allocated"], self.peaks["reserved"]
        a0, r0 = self.reserved_peak_start or (0, 0)
        return (f"allocated peak in {a_seg}; reserved {r / 2**30:.2f} GiB, peak in {r_seg}, which began at "
                f"{a0 / 2**30:.2f} GiB allocated, {r0 / 2**30:.2f} GiB reserved")
