"""The soak (benchmarks/soak.py) end to end with a handful of requests: it starts Ray and the server here, finds
the replica's process through Ray, reads its memory, answers every request and stops everything. The 5% bound
is the 300-request benchmark's (benchmarks/RESULTS.md); a run this short only checks the plumbing."""
from __future__ import annotations

import os

import pytest

from .conftest import started_here, wait_gone


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    from megafusion.benchmarks.soak import main

    assert main(["--requests", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "soak: error: --requests 0: needs an integer >= 1\n"
    assert main(["--max-growth", "-1"]) == 2
    assert "--max-growth -1.0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_short_soak_runs_and_leaves_nothing_behind(tmp_path):
    pytest.importorskip("ray.serve")
    from megafusion.benchmarks.soak import SoakConfig, markdown, soak

    before = started_here()
    res = soak(SoakConfig(requests=6, warmup=2, concurrency=2, sample_s=0.5), say=lambda s: None)
    assert res.statuses == {"200": 6}
    assert sum(res.batch_sizes.values()) == 6 and set(res.batch_sizes) <= {"1", "2", "3", "4"}
    assert res.replica_pid > 0 and res.replica_pid != os.getpid()
    # a replica holding torch and a model: tens of MiB at least, and a finite growth figure
    assert 50 < res.rss_start_mib and 50 < res.rss_warm_mib and 50 < res.rss_end_mib <= res.rss_peak_mib
    assert res.growth == pytest.approx((res.rss_end_mib - res.rss_warm_mib) / res.rss_warm_mib)
    assert res.p50_s is not None and res.p50_s <= res.p95_s
    text = markdown(res)
    assert "growth, end against baseline" in text and res.provenance["commit"] in text
    left = wait_gone(started_here() - before)
    assert not left, f"processes left behind: {sorted(left)}"
