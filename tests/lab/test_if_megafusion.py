"""benchmarks/lab/if_megafusion.py on tiny-if (CPU, shortened plans): rows per dtype, mode and plan, costs and
ratios beside the times, and a later run for another mode merged into the same report."""
from __future__ import annotations

import json

import pytest

import if_megafusion as bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_modes_rows_and_merge(tmp_path):
    common = ["--model", "tiny-if", "--device", "cpu", "--cascades", "I", "--output", str(tmp_path)]
    assert bench.main(common + ["--modes", "eager"]) == 0
    assert bench.main(common + ["--modes", "graphs"]) == 0
    report = json.loads((tmp_path / "if_megafusion.json").read_text())
    rows = {(r["mode"], r["kind"]): r for r in report["rows"]}
    assert set(rows) == {(m, k) for m in ("eager", "graphs") for k in ("direct", "megafusion")}
    assert len(report["runs"]) == 2 and report["runs"][1]["step_fraction"] == 0.05
    mf, direct = rows[("graphs", "megafusion")], rows[("graphs", "direct")]
    assert mf["plan"].startswith("16x16 x4 -> 32x32 x1") and direct["plan"].startswith("32x32 x5")
    assert 0 < mf["paper_gmacs_ours"] < direct["paper_gmacs_ours"] and mf["true_tflop"] > 0
    assert mf["speedup_vs_direct"] == pytest.approx(direct["seconds"] / mf["seconds"])
    assert mf["speedup_vs_eager"] == pytest.approx(rows[("eager", "megafusion")]["seconds"] / mf["seconds"])
    assert mf["paper_gmacs_table1"] is None and all(r["finite"] for r in rows.values())
    md = (tmp_path / "if_megafusion.md").read_text()
    assert md.count("| fp32 | graphs | I ") == 2 and md.count("| fp32 | eager | I ") == 2


def test_bad_mode_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", "tiny-if", "--device", "cpu", "--modes", "fast", "--output", "/nonexistent"])
    assert e.value.code == 2 and "--modes: unknown 'fast'" in capsys.readouterr().err


def test_engines_mode(tmp_path):
    pytest.importorskip("onnxruntime")
    from megafusion.core.if_family import TINY_IF
    from megafusion.core.if_loading import build_random_if
    from megafusion.engine.if_engines import build_if_engines

    plans = bench._plans(TINY_IF, 0.05)
    eng = tmp_path / "eng"
    build_if_engines(build_random_if(TINY_IF, 0), {1: plans[("I", "megafusion")]}, "onnxruntime", "fp32", eng)
    assert bench.main(["--model", "tiny-if", "--device", "cpu", "--cascades", "I", "--modes", "engines",
                       "--engines", str(eng), "--output", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "if_megafusion.json").read_text())["rows"]
    assert [(r["mode"], r["runs_as"], r["kind"]) for r in rows] == [("engines:onnxruntime", "eager", "direct"),
                                                                   ("engines:onnxruntime", "eager", "megafusion")]


def test_engines_mode_runs_alone(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny-if", "--device", "cpu", "--modes", "eager,engines", "--engines", "/x",
                    "--output", "/nonexistent"])
    assert "--modes engines runs alone" in capsys.readouterr().err
