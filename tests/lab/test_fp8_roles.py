"""benchmarks/lab/fp8_roles.py on the CPU: one role at a time in FP8 on a tiny model, against float32."""
from __future__ import annotations

import json

import pytest

import fp8_roles
from megafusion.engine.fp8 import Fp8Policy


def test_bad_size_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8_roles.main(["--model", "tiny-sd15", "--size", "128by128", "--output", str(tmp_path)])
    assert "--size 128by128" in capsys.readouterr().err


def test_cuda_refused_naming_the_gpu_measure(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fp8_roles.main(["--model", "tiny-sd15", "--device", "cuda", "--output", str(tmp_path)])
    assert "--device cuda: this measure runs on the cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_roles_one_at_a_time_on_tiny_sd15(tmp_path):
    fp8_roles.main(["--model", "tiny-sd15", "--timesteps", "999,21", "--output", str(tmp_path)])
    data = json.loads((tmp_path / "fp8-roles-tiny-sd15.json").read_text())
    assert data["restored"]  # the float layers went back after each variant
    rows = {r["variant"]: r for r in data["rows"]}
    default = rows.pop("default policy")
    assert set(rows) == set(fp8_roles.MEASURED)  # tiny-sd15 has layers of each
    # each role's layers are its own: the default policy's roles together are the default policy
    assert sum(r["layers"] for k, r in rows.items() if k in Fp8Policy().roles) == default["layers"]
    for k, r in rows.items():
        assert 0 < r["rel_l2_max"] < 0.05, (k, r)
        if k in Fp8Policy().roles:  # one role alone moves eps less than all of them
            assert r["rel_l2_max"] < default["rel_l2_max"], (k, r, default)
    md = (tmp_path / "fp8-roles-tiny-sd15.md").read_text()
    assert f"| default policy | {default['layers']} | {default['rel_l2_max']:.4f} |" in md
