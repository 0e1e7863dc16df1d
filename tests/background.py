"""The session's slow builds (AOTInductor packages of the tiny models, libmegafusion's CMake build) started as soon as
collection ends, in `nice`d processes, two at a time, so that they run on the cores the tests leave idle (the tests
are mostly one Python thread; CI has two cores). A fixture that needs a build waits for it; the builds the first
tests need come first in the queue. A build no selected test was known to need is made in the foreground when a
fixture asks for it (`Builds.get`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    name: str
    cmd: list[str]
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the session's
    after: str | None = None  # a job whose output this one needs
    done: threading.Event = field(default_factory=threading.Event)
    result: subprocess.CompletedProcess | None = None
    seconds: float | None = None  # how long the build ran
    began: float | None = None  # when it began, in seconds after the queue started
    waited: float = 0.0  # how long the tests stood waiting for it
    asked: float | None = None  # when a test first asked for it, in seconds after the queue started


class Builds:
    """A queue of named commands run in order by `workers` threads (two: while the tests wait for a build, both
    cores still work). `get(name)` waits for a queued one, or runs one that was not queued at once (in the
    foreground); `factory(builds, name)` makes the job of a name."""

    def __init__(self, workers: int = 2):
        self.factory = None
        self.workers = workers
        self.jobs: dict[str, Job] = {}
        self.root: Path | None = None
        self._pending: list[Job] = []  # queued, not yet taken by a worker
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._stop = False
        self._t0 = time.monotonic()

    def folder(self, name: str) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="mf-test-builds-"))
        return self.root / name

    def start(self, jobs: list[Job]) -> None:
        self._t0 = time.monotonic()
        for j in jobs:
            self.jobs[j.name] = j
            self._pending.append(j)
        for _ in range(min(self.workers, len(jobs))):
            threading.Thread(target=self._run, daemon=True).start()

    def _env(self, job: Job) -> dict[str, str]:
        return {**os.environ, "MEGAFUSION_CACHE": str(self.folder("mf-cache")), "HF_HUB_OFFLINE": "1", **job.env}

    def _run(self) -> None:
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        while (j := self._take()) is not None:
            if j.after is not None:
                self.jobs[j.after].done.wait()
            if self._stop:
                j.result = subprocess.CompletedProcess(j.cmd, 1, "", "the session ended first")
            else:
                t0 = time.monotonic()
                j.began = t0 - self._t0
                proc = subprocess.Popen(nice + j.cmd, cwd=j.cwd, env=self._env(j), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                self._procs.append(proc)
                out, err = proc.communicate()
                j.result = subprocess.CompletedProcess(j.cmd, proc.returncode, out, err)
                j.seconds = time.monotonic() - t0
            j.done.set()

    def _take(self) -> Job | None:
        """The first queued job whose `after` is done, else the first queued one (a worker stands idle behind a
        dependency only when no other job can run); None when none is left."""
        with self._lock:
            ready = [j for j in self._pending if j.after is None or self.jobs[j.after].done.is_set()]
            j = (ready or self._pending or [None])[0]
            if j is not None:
                self._pending.remove(j)
            return j

    def get(self, name: str) -> subprocess.CompletedProcess:
        """The finished build `name`: the queued one when it is done, else built now."""
        job = self.jobs.get(name)
        t0 = time.monotonic()
        asked = t0 - self._t0
        if job is None:
            job = self.factory(self, name)
            if job.after is not None:  # a build asked for outside the queue builds what it needs first
                self.get(job.after)
            self.jobs[name] = job
            job.began = t0 - self._t0
            job.result = subprocess.run(job.cmd, cwd=job.cwd, env=self._env(job), text=True, capture_output=True)
            job.seconds = time.monotonic() - t0
            job.done.set()
        job.done.wait()
        job.waited += time.monotonic() - t0
        job.asked = asked if job.asked is None else job.asked
        assert job.result.returncode == 0, (f"{name}: {' '.join(job.cmd)} exited {job.result.returncode}\n"
                                            + job.result.stdout[-3000:] + job.result.stderr[-3000:])
        return job.result

    def summary(self) -> list[str]:
        """A line per build that ran: how long it took and how long the tests waited for it (where CI's time
        goes: the builds, two at a time, are its longest path), with when it ran and when a test first asked for it,
        in seconds after the queue started (the timeline says which build a waiting test stood behind)."""
        return [f"{j.name}: built in {j.seconds:.0f} s (from {j.began:.0f} to {j.began + j.seconds:.0f} s), first "
                f"asked for at {'-' if j.asked is None else f'{j.asked:.0f}'} s, tests waited {j.waited:.0f} s"
                for j in self.jobs.values() if j.seconds is not None]

    def pids(self) -> set[int]:
        """The build processes running now (tests that check what they leave behind leave these out)."""
        return {p.pid for p in list(self._procs) if p.poll() is None}

    def stop(self) -> None:
        self._stop = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        if self.root is not None:
            for j in self.jobs.values():
                j.done.wait(timeout=30)
            shutil.rmtree(self.root, ignore_errors=True)


def build_engines_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "megafusion.cli.build_engines", *args]


def python_cmd(code: str) -> list[str]:
    return [sys.executable, "-c", code]


BUILDS = Builds()
"""The session's builds (tests/conftest.py queues them and says what each is)."""
