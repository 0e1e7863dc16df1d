"""Cold start: a fresh process from spawn to its first image on disk (interpreter start, imports, model and engine
load, compiles or captures, one generation), `mf-generate` run as a child. The device memory the child takes is
sampled from this process every 50 ms (device-wide used memory minus what was used before it started), so it
counts what the allocator's own peak statistics miss: the CUDA context, cuDNN workspaces, the load phase.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class ColdStart:
    """One fresh process's run."""

    name: str
    """Row label, e.g. 'engines:aoti' or 'compiled, warm cache'."""
    command: str
    """The child's command line."""
    seconds: float
    """Spawn to exit (the image is written before exit)."""
    returncode: int
    """The child's exit status (0: image written)."""
    device_peak_gib: float | None
    """Most device memory the child held at any sample (CUDA only)."""
    tail: str
    """The child's last output lines (its own segment times and peak)."""


def _used(device) -> int:
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return total - free


def run_cold(name: str, args: list[str], device, env: dict[str, str] | None = None,
             timeout: float | None = None) -> ColdStart:
    """`python -m megafusion.cli.generate ARGS` in a fresh process, timed and its device memory sampled."""
    import torch

    cuda = torch.device(device).type == "cuda"
    before = _used(device) if cuda else 0
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], _used(device) - before)

    cmd = [sys.executable, "-m", "megafusion.cli.generate", *args]
    sampler = threading.Thread(target=sample, daemon=True) if cuda else None
    t0 = time.perf_counter()
    if sampler:
        sampler.start()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout} s\n{(e.stdout or b'')!s}"
    seconds = time.perf_counter() - t0
    done.set()
    if sampler:
        sampler.join()
    tail = "\n".join(line for line in out.splitlines()[-12:] if "\r" not in line)
    return ColdStart(name, shlex.join(cmd), seconds, rc, peak[0] / GiB if cuda else None, tail)
