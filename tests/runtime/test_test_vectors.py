"""The test-vector writer that ctest checks the C++ core against (cpp/tests/test_vectors.cpp)."""
from __future__ import annotations

import json

from megafusion.core.families import FAMILIES
from megafusion.runtime.test_vectors import main


def test_writes_every_section(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "v")]) == 0
    data = json.loads((tmp_path / "v" / "test_vectors.json").read_text())
    unet_families = [n for n, f in FAMILIES.items() if f.kind in ("sd15", "sdxl")]  # what the C++ core takes
    assert data["format"] == 1 and [f["name"] for f in data["families"]] == unet_families
    assert {c["family"] for c in data["plans"]} == set(unet_families)
    # Both outcomes are covered: plans and refusals (with their messages), for default and explicit plans.
    for section in ("plans", "validate", "parse"):
        assert any("error" in c for c in data[section]) and any("error" not in c for c in data[section])
    stage2 = [c["per_stage"][1] for c in data["schedules"] if len(c["per_stage"]) > 1 and c["reschedule"]]
    assert stage2 and all(s["gamma"] > 1 for s in stage2)  # re-scheduling is exercised
    assert all(len(c["input"]) and len(c["output"]) for c in data["bicubic"])
