"""mf-generate --engines prints its start split into parts (benchmarks/cold_start.py `start_line`) and, after the
image, what the first image spent where (`first_image_line`), and once the PNG is on disk its
seconds and the process age (`saved_line`); the cold-start parser reads them back as parts."""
from __future__ import annotations

import pytest

from megafusion.benchmarks.cold_start import image_on_disk, parse_phases
from megafusion.cli import generate as gen_cli

STAGES = "128x128:2,256x256:2"


def test_generate_from_engines_prints_the_first_image_parts(sdxl_engines, tmp_path, capsys):
    args = ["--model", "tiny-sdxl", "--stages", STAGES, "--prompt", "a cat", "--no-progress", "--seed", "5",
            "--engines", str(sdxl_engines), "--output", str(tmp_path / "o.png")]
    assert gen_cli.main(args) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("cold-start first image: "))
    assert line.endswith("(0 graphs captured)")  # CPU: the stages run eagerly
    phases = parse_phases(out, 1000.0)
    parts = {k.removeprefix("first image/") for k in phases if k.startswith("first image/")}
    # the saved line splits the rest into the PNG, the exit (1000 s less the age at the save) and what is left
    assert parts == {"text encoders", "stages", "graph captures", "relays", "decode", "png", "exit", "other"}
    assert phases["first image/graph captures"] == 0.0 and phases["first image/stages"] > 0
    assert 0 < phases["first image/png"] < phases["first image"]
    age = image_on_disk(out)
    assert age is not None and phases["first image/exit"] == pytest.approx(1000.0 - age)
    start = {k.removeprefix("start/") for k in phases if k.startswith("start/")}
    assert start == {"interpreter and imports", "memory estimate", "checks"}  # /proc gives the ages on Linux
    assert phases["start/interpreter and imports"] <= phases["start"]
