"""`mf-build-engines --jobs N`: the plan's networks built by N child processes of the same command, each on its
own `--networks` share, into one engine folder (the cache commits under its lock). Each line a child prints is
shown with its share's name; a child's failure is reported and makes the whole build fail.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

from ..core.families import ModelFamily
from ..core.plan import StagePlan

GiB = 2**30


def _available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def job_ram(family: ModelFamily, plan: StagePlan) -> int:
    """RAM one child needs at most: the model as loaded (fp32) plus the copy an export holds."""
    import torch

    from ..core.memory import estimate_memory

    return 2 * estimate_memory(family, plan, torch.float32, torch.float32).weights_bytes


def without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` without the given flags and their values (`--flag V` or `--flag=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def _relay(prefix: str, stream) -> None:
    for line in stream:
        print(f"[{prefix}] {line}", end="", flush=True)


def build_in_parallel(argv: list[str], family: ModelFamily, plan: StagePlan, selectors: tuple[str, ...],
                      jobs: int) -> int:
    """Runs the build as at most `jobs` children (fewer where free RAM holds fewer); returns the worst status."""
    need, avail = job_ram(family, plan), _available_ram()
    fit = min(jobs, len(selectors))
    if avail is not None and need * fit > avail:
        fit = max(1, avail // need)
        print(f"--jobs {jobs}: {avail / GiB:.1f} GiB of free RAM holds {fit} build(s) of about "
              f"{need / GiB:.1f} GiB each; running {fit}", flush=True)
    groups = [selectors[i::fit] for i in range(fit)]
    base = without(argv, ("--jobs", "--networks"))
    cmd = [sys.executable, "-m", "megafusion.cli.build_engines", *base]
    t0 = time.perf_counter()
    children = []
    for g in groups:
        name = ",".join(g)
        print(f"[{name}] started", flush=True)
        p = subprocess.Popen([*cmd, "--networks", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t = threading.Thread(target=_relay, args=(name, p.stdout), daemon=True)
        t.start()
        children.append((name, p, t))
    worst = 0
    for name, p, t in children:
        rc = p.wait()
        t.join()
        print(f"[{name}] {'done' if rc == 0 else f'failed (status {rc})'} after {time.perf_counter() - t0:.1f} s",
              flush=True)
        worst = max(worst, rc)
    print(f"{len(groups)} parallel build(s) {'done' if worst == 0 else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
    return worst
