"""The tools by name, and the check that one refused its input as every tool must: one line `prog: error: ...`
naming the value, exit status 2, no traceback."""
from __future__ import annotations

from megafusion.cli import bench as bench_cli
from megafusion.cli import build_engines as build_cli
from megafusion.cli import generate as gen_cli

TOOLS = {"mf-generate": gen_cli.main, "mf-bench": bench_cli.main, "mf-build-engines": build_cli.main}


def refused(prog, argv, capsys, *needles) -> str:
    """Runs `prog argv`; asserts the refusal and that every needle is in its one line, which it returns."""
    rc = TOOLS[prog](argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err
