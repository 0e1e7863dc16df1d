"""Timing and the machine's description: CUDA events on a GPU, perf_counter with synchronize elsewhere."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

R = TypeVar("R")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], R], device: torch.device) -> tuple[float, R]:
    """Seconds `fn()` takes on `device` (all its queued work included), and what it returned."""
    synchronize(device)  # nothing queued before the call is charged to it
    if device.type == "cuda":
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@dataclass
class Measurement:
    """Repeated timed calls of one thing, after warm-up."""

    totals_s: list[float] = field(default_factory=list)
    """Total seconds of each timed repeat."""
    segments_s: list[list[tuple[str, float]]] = field(default_factory=list)
    """Each repeat's (segment, seconds) breakdown, as the generator reported it."""
    first_s: float | None = None
    """Seconds of the very first call (compiles, captures and cuDNN's algorithm search included)."""
    first_peak: tuple[int, int] | None = None
    """(allocated, reserved) peak device bytes during the first call (CUDA only)."""
    steady_peak: tuple[int, int] | None = None
    """(allocated, reserved) peak device bytes over the timed calls (CUDA only)."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.totals_s)

    def segment_medians(self) -> list[tuple[str, float]]:
        """Median seconds per segment position (names from the first repeat)."""
        if not self.segments_s:
            return []
        names = [n for n, _ in self.segments_s[0]]
        n = min(len(r) for r in self.segments_s)
        return [(names[i], statistics.median(r[i][1] for r in self.segments_s)) for i in range(n)]


def measure(fn: Callable[[], list[tuple[str, float]]], device: torch.device, repeats: int,
            warmup: int) -> Measurement:
    """Runs `fn` `warmup` times untimed, then `repeats` times timed; `fn` returns its segment times."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    m = Measurement()
    for i in range(warmup + repeats):
        _reset_peak(device)  # per call (the pipeline also resets at its start): the max over calls is kept
        seconds, segments = time_call(fn, device)
        peak = _peak(device)
        if i == 0:
            m.first_s, m.first_peak = seconds, peak
        if i >= warmup:
            m.totals_s.append(seconds)
            m.segments_s.append(list(segments))
            if peak is not None:
                m.steady_peak = tuple(map(max, zip(m.steady_peak or (0, 0), peak)))
    return m


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def peak_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20,
                       dtype: torch.dtype = torch.float16) -> float:
    """Achieved TFLOP/s of an n^3 matmul on a GPU: the practical peak to hold results against."""
    if device.type != "cuda":
        raise ValueError("the matmul peak is measured on a CUDA device only")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # clocks and cuBLAS heuristics settle
        a @ b
    seconds, _ = time_call(lambda: [a @ b for _ in range(iters)], device)
    return 2.0 * n**3 * iters / seconds / 1e12


@dataclass(frozen=True)
class Environment:
    """Where and with what a benchmark ran."""

    date_utc: str
    """ISO 8601 time of the run."""
    device: str
    """The torch device the benchmark ran on."""
    device_name: str
    """GPU name (torch.cuda.get_device_name), or the CPU's description."""
    driver: str | None
    """NVIDIA driver version from nvidia-smi, where available."""
    cuda: str | None
    """CUDA version torch was built with."""
    torch: str
    """torch version."""
    diffusers: str
    """diffusers version."""
    transformers: str
    """transformers version."""
    python: str
    """Python version."""
    platform: str
    """OS and architecture."""
    commit: str | None = None
    """Git commit of the code that ran (see `source_commit`), or None where it cannot be told."""
    dirty: bool | None = None
    """Whether the working tree differed from that commit."""
    command: str = ""
    """The command line that produced the numbers."""


def nvidia_driver() -> str | None:
    """Driver version via nvidia-smi; None where there is no nvidia-smi or it fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[0] if lines else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


COMMIT_ENV = "MEGAFUSION_COMMIT"
"""Where there is no git checkout (a copy of the tree on a lent GPU machine), the caller names the commit here,
as `<sha>` or `<sha>-dirty`."""


def source_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout this package runs from; else from $MEGAFUSION_COMMIT; else (None, None)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20, check=True).stdout
        return sha, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        given = os.environ.get(COMMIT_ENV, "").strip()
        if not given:
            return None, None
        return given.removesuffix("-dirty"), given.endswith("-dirty")


def command_line() -> str:
    """How this process was started, as a shell would take it (`python3 -m megafusion.cli.bench ...`)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if argv and argv[0] == sys.executable:
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)


def provenance() -> dict[str, object]:
    """What every saved result records besides its numbers: date, commit, dirty tree, command."""
    commit, dirty = source_commit()
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "dirty": dirty, "command": command_line()}


def environment(device: torch.device) -> Environment:
    import diffusers
    import transformers

    if device.type == "cuda":
        name, driver = torch.cuda.get_device_name(device), nvidia_driver()
    else:
        name, driver = cpu_name(), None
    prov = provenance()
    return Environment(
        date_utc=prov["date_utc"],
        device=str(device), device_name=name, driver=driver, cuda=torch.version.cuda,
        torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
        python=platform.python_version(), platform=platform.platform(),
        commit=prov["commit"], dirty=prov["dirty"], command=prov["command"],
    )
