"""Cold start: a fresh process from spawn to its first image on disk (interpreter start, imports, model and engine
load, compiles or captures, one generation), `mf-generate` run as a child. The device memory the child takes is
sampled from this process every 50 ms (device-wide used memory minus what was used before it started), so it
counts what the allocator's own peak statistics miss: the CUDA context, cuDNN workspaces, the load phase.

With `--engines`, the child prints its phases in one line (`phase_line`), which `ColdStart.phases` reads back:
start (interpreter, imports, argument checks, memory estimate: the process's age when the load begins), model load,
weights fingerprint check, engine file verification, engine open, and the rest (the first image, its PNG, exit);
after the image, a second line (`first_image_line`) splits the first image into its segments and graph captures,
and a third (`saved_line`) gives the PNG's own seconds and the process's age once it is on disk, so the exit
(interpreter and CUDA teardown, after the image exists) is reported apart from the time to the image.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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
    phases: dict[str, float] | None = None
    """Seconds per phase as the child printed them (`phase_line`), the rest of `seconds` as `first image`; None when
    it printed none (runs without engines)."""
    image_on_disk_s: float | None = None
    """Spawn to the PNG renamed into place (the child's age then, `saved_line`); None when it printed none."""
    cache_lines: tuple[str, ...] = ()
    """The child's lines about its compile cache (`compile cache: ...`, `compiled functions: ...`): whether it
    started warm, and how many compiled functions it loaded against traced."""

    def describe_phases(self) -> str:
        """'start 3.1 s, model load 0.2 s, ...' ('' without phases)."""
        return ", ".join(f"{k} {v:.2f} s" for k, v in (self.phases or {}).items())


PHASES = ("start", "model load", "fingerprint", "verify", "open")
_PHASE_PREFIX = "cold-start phases: "


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc, 10 ms ticks), None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in ticks since boot
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def phase_line(start_s: float | None, load_s: float, engine: dict[str, float]) -> str:
    """The line mf-generate prints after opening engines: each of `PHASES` in seconds (start '?' if unknown)."""
    values = [start_s, load_s, engine["fingerprint"], engine["verify"], engine["open"]]
    return _PHASE_PREFIX + ", ".join(f"{name} {'?' if v is None else f'{v:.2f}'} s" for name, v in zip(PHASES, values))


_FIRST_PREFIX = "cold-start first image: "


def first_image_line(timings: list[tuple[str, float]], captures: int, capture_s: float) -> str:
    """The line mf-generate prints after its first image from engines: the generation's segments by kind (text
    encoders, stages, relays, decode, ...), the CUDA graph captures (their warm-up steps included) apart from the
    stages they ran in, and how many graphs were captured."""
    kinds: dict[str, float] = {}
    for name, s in timings:
        kind = "stages" if name.startswith("stage ") else "relays" if name.startswith("relay ") else name
        kinds[kind] = kinds.get(kind, 0.0) + s
    if "stages" in kinds:
        kinds["stages"] -= capture_s
        kinds["graph captures"] = capture_s
    return (_FIRST_PREFIX + ", ".join(f"{k} {v:.2f} s" for k, v in kinds.items())
            + f" ({captures} graph{'s' * (captures != 1)} captured)")


_START_PREFIX = "cold-start start: "


def start_line(run_age: float | None, estimate_s: float, start_s: float | None) -> str:
    """The line mf-generate prints beside `phase_line`: its start split into the interpreter, imports and argument
    parsing (the process's age when its run began), the memory estimate, and the checks between (what is left of
    start); parts it cannot know ('?' ages) are left out."""
    parts = {"interpreter and imports": run_age, "memory estimate": estimate_s}
    if run_age is not None and start_s is not None:
        parts["checks"] = max(start_s - run_age - estimate_s, 0.0)
    return _START_PREFIX + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items() if v is not None)


_COMPILE_PREFIX = "cold-start compile: "


def compile_line(seconds: dict[str, float], counts: dict[str, int]) -> str:
    """The line mf-generate --mode compiled prints after its first image: where torch.compile's time went
    (`engine.compile_cache.compile_profile`), inside the first image's stages and captures, and the caches' hits."""
    return (_COMPILE_PREFIX + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
            + " (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")


def _seconds(line: str) -> dict[str, float]:
    return {name.strip(): float(v) for name, v in re.findall(r"([a-z ]+?) ([0-9.]+) s", line)}


_SAVED_PREFIX = "cold-start saved: "


def saved_line(png_s: float, age: float | None) -> str:
    """The line mf-generate prints once its PNG is on disk: the PNG's encode and write, and the process's age then
    ('?' where /proc cannot tell it)."""
    return _SAVED_PREFIX + f"png {png_s:.2f} s, age {'?' if age is None else f'{age:.2f}'} s"


def image_on_disk(output: str) -> float | None:
    """The child's age when its PNG was on disk (`saved_line`), None if it printed none or could not tell."""
    line = next((ln for ln in output.splitlines() if ln.startswith(_SAVED_PREFIX)), None)
    return None if line is None else _seconds(line.removeprefix(_SAVED_PREFIX)).get("age")


def parse_phases(output: str, seconds: float) -> dict[str, float] | None:
    """The phases from a child's output (`phase_line`), plus `first image`: the rest of its `seconds`; where the
    child printed `start_line` and `first_image_line`, their parts too (`start/<part>`, `first image/<part>`, the
    rest of the first image as `first image/png and exit`). With `saved_line` too, that rest is split into
    `first image/png` (encode and write), `first image/exit` (`seconds` less the age at the save) and
    `first image/other` (what is left: printing, the rename)."""
    lines = output.splitlines()
    line = next((ln for ln in lines if ln.startswith(_PHASE_PREFIX)), None)
    if line is None:
        return None
    phases = _seconds(line.removeprefix(_PHASE_PREFIX))
    phases["first image"] = seconds - sum(phases.values())
    for phase, prefix, rest in (("start", _START_PREFIX, None), ("first image", _FIRST_PREFIX, "png and exit")):
        found = next((ln for ln in lines if ln.startswith(prefix)), None)
        if found is None or phase not in phases:
            continue
        parts = _seconds(found.removeprefix(prefix))
        phases.update({f"{phase}/{k}": v for k, v in parts.items()})
        if rest is not None:
            phases[f"{phase}/{rest}"] = phases[phase] - sum(parts.values())
    compiled = next((ln for ln in lines if ln.startswith(_COMPILE_PREFIX)), None)
    if compiled is not None:  # inside the first image's stages: reported beside them, not subtracted
        parts = _seconds(compiled.removeprefix(_COMPILE_PREFIX).split(" (")[0])
        phases.update({f"compile/{k}": v for k, v in parts.items()})
    saved = next((ln for ln in lines if ln.startswith(_SAVED_PREFIX)), None)
    rest = phases.get("first image/png and exit")
    if saved is not None and rest is not None:
        parts = _seconds(saved.removeprefix(_SAVED_PREFIX))
        if "age" in parts:
            del phases["first image/png and exit"]
            phases["first image/png"] = parts["png"]
            phases["first image/exit"] = seconds - parts["age"]
            phases["first image/other"] = rest - parts["png"] - phases["first image/exit"]
    return phases


def _used(device) -> int:
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return total - free


def cache_lines(output: str) -> tuple[str, ...]:
    """A child's lines about its compile cache (mf-generate --mode compiled: `compile cache: ...`, and
    `compiled functions: N loaded, M traced, ...`, cli/generate.py `precompile_line`)."""
    return tuple(ln for ln in output.splitlines() if ln.startswith(("compile cache:", "compiled functions:")))


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
    phases = parse_phases(out, seconds) if rc == 0 else None
    on_disk = image_on_disk(out) if rc == 0 else None
    return ColdStart(name, shlex.join(cmd), seconds, rc, peak[0] / GiB if cuda else None, tail, phases, on_disk,
                     cache_lines(out))
