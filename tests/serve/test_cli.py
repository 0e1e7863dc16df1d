"""`mf-serve` as a process: a local Ray started and stopped on SIGTERM with nothing left behind, several
replicas deployed onto a running cluster (--address), and a model that cannot start (status 1, one line)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")

from .conftest import descendants, free_port, get, post, started_here, wait_gone  # noqa: E402

pytestmark = pytest.mark.slow
SHORT = {"prompt": "a red cube", "stages": "128x128:1,256x256:1"}


class Proc:
    """mf-serve in a subprocess; its output collected by a thread, every wait bounded."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.p = subprocess.Popen([sys.executable, "-m", "megafusion.cli.serve", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.seen: set[int] = set()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end and self.p.poll() is None:
            self.seen |= descendants(self.p.pid)
            if any(text in ln for ln in self.lines):
                return True
            time.sleep(0.5)
        return any(text in ln for ln in self.lines)

    def ours(self) -> list[str]:
        return [ln for ln in self.lines if ln.startswith("mf-serve")]

    def stop(self, seconds: float = 90) -> int:
        self.seen |= descendants(self.p.pid)
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(seconds)
        finally:
            if self.p.poll() is None:  # never leave it running: kill this one process by its id
                self.p.kill()
                self.p.wait(10)
            self.reader.join(10)


def test_local_ray_serves_and_stops_on_sigterm_leaving_nothing():
    port = free_port()
    proc = Proc(["--model", "tiny-sd15", "--device", "cpu", "--sizes", "256x256", "--port", str(port),
                 "--timeout", "60"])
    try:
        assert proc.wait_for("mf-serve: serving;", 240), proc.lines[-30:]
        code, _, body = get(f"http://127.0.0.1:{port}/v1/health")
        assert code == 200 and json.loads(body)["status"] == "ready"
        code, headers, png = post(f"http://127.0.0.1:{port}/v1/generate", SHORT)
        assert code == 200 and png.startswith(b"\x89PNG")
        # the log says what was warmed, and that the replicas import this tree's package
        assert any("warm-up 256x256 done" in ln for ln in proc.lines), proc.lines
        here = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..", "serve"))
        assert any(f"megafusion.serve from {here}," in ln for ln in proc.lines), proc.lines
    finally:
        rc = proc.stop()
    assert rc == 0, proc.lines[-20:]
    assert proc.ours()[-2:] == ["mf-serve: stopping", "mf-serve: stopped"]
    assert len(proc.seen) >= 3  # gcs, raylet, workers...
    left = wait_gone(proc.seen)
    assert not left, f"left behind: {sorted(left)}"


def test_several_replicas_on_a_running_cluster():
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = started_here()
    try:
        address = ray.get_runtime_context().gcs_address
        port = free_port()
        proc = Proc(["--model", "tiny-sd15", "--device", "cpu", "--sizes", "256x256", "--port", str(port),
                     "--replicas", "2", "--max-batch", "1", "--address", address])
        try:
            assert proc.wait_for("mf-serve: serving;", 240), proc.lines[-30:]
            assert any("joined the Ray cluster" in ln for ln in proc.ours())
            code, _, body = get(f"http://127.0.0.1:{port}/v1/health")
            assert code == 200 and json.loads(body)["replicas_warm"] == 2
            bodies = [{**SHORT, "seed": i} for i in range(6)]
            with ThreadPoolExecutor(6) as pool:
                out = list(pool.map(lambda b: post(f"http://127.0.0.1:{port}/v1/generate", b, timeout=120), bodies))
            assert [c for c, _, _ in out] == [200] * 6
            assert len({h["x-megafusion-replica"] for _, h, _ in out}) == 2  # both replicas served
        finally:
            rc = proc.stop()
        assert rc == 0 and proc.ours()[-1] == "mf-serve: stopped (the cluster keeps running)"
        assert ray.is_initialized()
        apps = serve.status().applications
        assert "megafusion" not in apps and "megafusion-model" not in apps  # undeployed; Serve itself stays
    finally:
        started |= started_here()
        serve.shutdown()
        ray.shutdown()
    assert not wait_gone(started)


def test_a_model_that_cannot_start_is_one_line_status_1(tiny_sd15, tmp_path):
    """Flags every check before Ray passes (an --engines folder that serves no size is one of those now), and a
    model its replica then fails to load: a damaged weights file, which nothing reads before the load."""
    from tests.core.test_loading import _save

    folder = tmp_path / "model"
    _save(tiny_sd15, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = Proc(["--model", "tiny-sd15", "--model-path", str(folder), "--device", "cpu", "--sizes", "256x256",
                 "--port", str(free_port())])
    try:
        proc.wait_for("mf-serve: error:", 240)
    finally:
        rc = proc.stop()
    assert rc == 1
    errors = [ln for ln in proc.ours() if ln.startswith("mf-serve: error:")]
    assert len(errors) == 1 and "the model did not start" in errors[0] and "could not load tiny-sd15 weights" \
        in errors[0] and "diffusion_pytorch_model.safetensors" in errors[0], proc.lines[-30:]
    assert not wait_gone(proc.seen)
