"""The session's slow builds (AOTInductor packages of the tiny models, libmegafusion's CMake build) started as soon as
collection ends, one after another in a `nice`d worker process each, so that they run on the core the tests leave
idle (the tests are mostly one Python thread; CI has two cores). A fixture that needs a build waits for it; the
first tests to need a build come first in the queue. Without a scheduled build (a subset of the tests, or `-k`),
fixtures build in the foreground as they always did: `Builds.wait` returns None and the fixture does the work.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    name: str
    cmd: list[str]
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the session's
    done: threading.Event = field(default_factory=threading.Event)
    result: subprocess.CompletedProcess | None = None


class Builds:
    """A queue of named commands run in order by one thread. `get(name)` waits for a queued one, or runs one that
    was not queued at once (in the foreground); `factory(builds, name)` makes the job of a name."""

    def __init__(self):
        self.factory = None
        self.jobs: dict[str, Job] = {}
        self.root: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._stop = False

    def folder(self, name: str) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="mf-test-builds-"))
        return self.root / name

    def start(self, jobs: list[Job]) -> None:
        for j in jobs:
            self.jobs[j.name] = j
        threading.Thread(target=self._run, args=(jobs,), daemon=True).start()

    def _env(self, job: Job) -> dict[str, str]:
        return {**os.environ, "MEGAFUSION_CACHE": str(self.folder("mf-cache")), "HF_HUB_OFFLINE": "1", **job.env}

    def _run(self, jobs: list[Job]) -> None:
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        for j in jobs:
            if self._stop:
                j.result = subprocess.CompletedProcess(j.cmd, 1, "", "the session ended first")
            else:
                self._proc = subprocess.Popen(nice + j.cmd, cwd=j.cwd, env=self._env(j), text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = self._proc.communicate()
                j.result = subprocess.CompletedProcess(j.cmd, self._proc.returncode, out, err)
            j.done.set()

    def get(self, name: str) -> subprocess.CompletedProcess:
        """The finished build `name`: the queued one when it is done, else built now."""
        job = self.jobs.get(name)
        if job is None:
            job = self.jobs[name] = self.factory(self, name)
            job.result = subprocess.run(job.cmd, cwd=job.cwd, env=self._env(job), text=True, capture_output=True)
            job.done.set()
        job.done.wait()
        assert job.result.returncode == 0, (f"{name}: {' '.join(job.cmd)} exited {job.result.returncode}\n"
                                            + job.result.stdout[-3000:] + job.result.stderr[-3000:])
        return job.result

    def stop(self) -> None:
        self._stop = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
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
