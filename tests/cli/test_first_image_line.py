"""mf-generate --engines prints its start split into parts (benchmarks/cold_start.py `start_line`) and, after the
image, what the first image spent where (`first_image_line`); the cold-start parser reads both back as parts."""
from __future__ import annotations

from megafusion.benchmarks.cold_start import parse_phases
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
    assert parts == {"text encoders", "stages", "graph captures", "relays", "decode", "png and exit"}
    assert phases["first image/graph captures"] == 0.0 and phases["first image/stages"] > 0
    start = {k.removeprefix("start/") for k in phases if k.startswith("start/")}
    assert start == {"interpreter and imports", "memory estimate", "checks"}  # /proc gives the ages on Linux
    assert phases["start/interpreter and imports"] <= phases["start"]
