"""benchmarks/lab/cli_fuzz.py: what counts as a finding, and one case each way through a real subprocess (a refusal
of mf-generate is none; a module that does not exist, a traceback and status 1, is one)."""
from __future__ import annotations

import cli_fuzz
import pytest


@pytest.mark.parametrize("rc,stderr,expected", [
    (0, "", False),
    (2, "usage: mf-generate [-h]\n  [--size SIZE]\nmf-generate: error: --size 'abc': not WxH\n", False),
    (2, "error: --size 'abc'\nand a second line\n", True),
    (1, "one line\n", True),
    (2, "Traceback (most recent call last):\n", True),
    ("timeout", "", True),
])
def test_finding(rc, stderr, expected):
    assert cli_fuzz.finding(rc, stderr) is expected


def test_a_refusal_is_no_finding_and_a_crash_is_one(tmp_path, monkeypatch):
    assert cli_fuzz.run_case("generate", "--size", "128x-128", tmp_path, 120) is None
    monkeypatch.setitem(cli_fuzz.BASE, "build", ["megafusion.no_such_module"])
    f = cli_fuzz.run_case("build", "--size", "abc", tmp_path, 120)
    assert f is not None and f["status"] == 1 and "No module named" in f["stderr"]
    assert list(tmp_path.iterdir()) == []  # each case's scratch folder removed


def test_unknown_tool_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_fuzz.main(["--tools", "serve", "--output", str(tmp_path)])
    assert e.value.code == 2 and "--tools 'serve'" in capsys.readouterr().err
    assert not (tmp_path / "cli_fuzz.json").exists()
