"""benchmarks/lab/dit_speed.py on the pipeline's modes, smoke-tested on tiny-sd3 on the CPU (no timings checked)."""
from __future__ import annotations

import json

import dit_speed


def test_modes_run_the_pipeline_and_report_ratios(tmp_path, capsys):
    assert dit_speed.main(["--model", "tiny-sd3", "--device", "cpu", "--dtype", "fp32", "--modes", "graphs,eager",
                           "--warmup", "0", "--output", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "dit_speed_tiny-sd3.json").read_text())
    assert list(res["modes"]) == ["eager", "graphs"]  # run in FLOW_MODES order
    eager, graphs = res["modes"]["eager"], res["modes"]["graphs"]
    for plan in ("megafusion", "direct"):  # the graphs mode's buffered step is the eager step on the CPU
        assert graphs[plan]["image_mean"] == eager[plan]["image_mean"] and graphs[plan]["finite"]
    assert graphs["graph_captures"] == 0 and "graph_captures" not in eager
    assert set(res["graphs_over_eager"]) == {"megafusion", "direct"}
    # MegaFusion's segments hold direct's (the last size's transformer and decode) and its relays'
    assert res["estimate_gib"]["megafusion"] >= res["estimate_gib"]["direct"] > 0
    table = (tmp_path / "dit_speed_tiny-sd3.md").read_text()
    assert "| graphs | 128x128 x20 -> 256x256 x8" in table
    assert f"Commit {res['provenance']['commit']}" in table and res["provenance"]["command"] in table


def test_unknown_mode_is_one_line(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        dit_speed.main(["--model", "tiny-sd3", "--device", "cpu", "--modes", "eager,fast", "--output", str(tmp_path)])
    assert e.value.code == 2 and "unknown mode 'fast'" in capsys.readouterr().err


def test_a_run_cut_off_in_a_later_mode_keeps_the_modes_it_finished(tmp_path, monkeypatch):
    import pytest

    real = dit_speed.networks

    def networks(bundle, mode, *args):  # the second mode dies as a time limit's kill would end it
        if mode == "graphs":
            raise KeyboardInterrupt
        return real(bundle, mode, *args)

    monkeypatch.setattr(dit_speed, "networks", networks)
    with pytest.raises(KeyboardInterrupt):
        dit_speed.main(["--model", "tiny-flux", "--device", "cpu", "--dtype", "fp32", "--modes", "eager,graphs",
                        "--warmup", "1", "--output", str(tmp_path)])
    res = json.loads((tmp_path / "dit_speed_tiny-flux.json").read_text())
    assert list(res["modes"]) == ["eager"] and "graphs_over_eager" not in res
    assert [len(res["modes"]["eager"][p]["warmup_s"]) for p in ("megafusion", "direct")] == [1, 1]
    assert not list(tmp_path.glob("*.tmp"))
