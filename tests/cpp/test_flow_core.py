"""The C++ flow schedule and transformer-family table (cpp/src/flow_schedule.cpp) against runtime/flow_schedule.py
through the shared vectors (runtime/flow_test_vectors.py; ctest flow_core_matches_python): float64 within 1e-12
relative. Builds only the core test (plain C++, no libtorch): seconds."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megafusion.runtime.flow_test_vectors import main as write_vectors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def flow_core(tmp_path_factory) -> tuple[Path, Path]:
    """(the built megafusion_flow_core_test, the folder holding the vectors)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    build, vec = tmp_path_factory.mktemp("flow-core"), tmp_path_factory.mktemp("flow-vectors")
    assert write_vectors(["--output", str(vec)]) == 0
    for cmd in ([cmake, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DMEGAFUSION_TEST_VECTORS={vec}",
                 f"-DPython3_EXECUTABLE={sys.executable}"],
                [cmake, "--build", build, "--target", "megafusion_flow_core_test", "-j2"]):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return build, vec


def test_vectors_cover_both_shift_rules(tmp_path):
    assert write_vectors(["--output", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "flow_test_vectors.json").read_text())
    assert {f["name"] for f in d["families"]} == {"sd3", "flux", "tiny-sd3", "tiny-flux"}
    shifts = {c["family"]: [s["shift"] for s in c["per_stage"]] for c in d["schedules"] if c["reschedule"]}
    assert shifts["sd3"][0] == 3.0 and shifts["flux"][0] != 3.0  # the last plan of each: 3 stages, own shifts
    assert all(c["per_stage"][-1]["sigma_s"][-1] == 0.0 for c in d["schedules"])


def test_cpp_schedule_matches_python(flow_core):
    build, _ = flow_core
    r = subprocess.run(["ctest", "--test-dir", str(build), "-R", "flow_core_matches_python", "--output-on-failure"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_cpp_schedule_refuses_a_changed_vector(flow_core, tmp_path):
    """The check can fail: one sigma off by 1e-9 relative is reported with its place."""
    build, vec = flow_core
    d = json.loads((vec / "flow_test_vectors.json").read_text())
    d["schedules"][3]["per_stage"][1]["sigma_t"][0] *= 1 + 1e-9
    (tmp_path / "bad.json").write_text(json.dumps(d))
    exe = next(build.rglob("megafusion_flow_core_test"))
    r = subprocess.run([str(exe), str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert r.returncode == 1 and "stage 2: sigma_t 0" in r.stderr and "1 failed" in r.stdout
