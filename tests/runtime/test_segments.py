"""SegmentClock's memory report: where the allocated and reserved peaks were reached, and what the segment holding
the reserved peak began with (so a report tells a gap that segment opened from one it found). The CUDA allocator's
counters are stood in for by a scripted sequence: the CPU has none."""
from __future__ import annotations

import torch

from megafusion.runtime.segments import SegmentClock

GiB = 2**30


def test_the_reserved_peak_names_its_segment_and_what_that_segment_began_with(monkeypatch):
    # (allocated now, reserved now, allocated peak, reserved peak) read at each mark, in order
    state = {"now": (2 * GiB, 2 * GiB), "peak": (2 * GiB, 2 * GiB)}
    for name, fn in (("synchronize", lambda device=None: None), ("reset_peak_memory_stats", lambda device=None: None),
                     ("memory_allocated", lambda device=None: state["now"][0]),
                     ("memory_reserved", lambda device=None: state["now"][1]),
                     ("max_memory_allocated", lambda device=None: state["peak"][0]),
                     ("max_memory_reserved", lambda device=None: state["peak"][1])):
        monkeypatch.setattr(torch.cuda, name, fn)
    clock = SegmentClock(torch.device("cuda", 0))
    state.update(now=(6 * GiB, 9 * GiB), peak=(10 * GiB, 12 * GiB))
    clock.mark("stage 2")  # the stage's pool: its peak, then released down to 6 / 9 GiB
    state.update(now=(6 * GiB, 13 * GiB), peak=(11 * GiB, 14 * GiB))
    clock.mark("decode")
    assert clock.peaks == {"allocated": (11 * GiB, "decode"), "reserved": (14 * GiB, "decode")}
    assert clock.reserved_peak_start == (6 * GiB, 9 * GiB)  # the state stage 2 left, not the clock's start
    assert clock.peak_detail() == ("allocated peak in decode; reserved 14.00 GiB, peak in decode, which began at "
                                   "6.00 GiB allocated, 9.00 GiB reserved")


def test_off_cuda_no_memory_report():
    clock = SegmentClock(torch.device("cpu"))
    clock.mark("stage 1")
    assert clock.peak_detail() == "" and clock.reserved_peak_start is None
