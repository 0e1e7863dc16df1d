"""The phases a fresh mf-generate process prints (benchmarks/cold_start.py) and their reading back."""
from __future__ import annotations

import pytest

from megafusion.benchmarks.cold_start import PHASES, parse_phases, phase_line, process_age


def test_phase_line_reads_back_with_the_rest_as_first_image():
    line = phase_line(3.25, 0.5, {"fingerprint": 0.01, "verify": 1.5, "open": 4.0})
    phases = parse_phases(f"model loaded in 0.5 s\n{line}\nwrote x.png\n", 12.0)
    assert list(phases) == [*PHASES, "first image"]
    assert phases["start"] == 3.25 and phases["verify"] == 1.5 and phases["open"] == 4.0
    assert phases["first image"] == pytest.approx(12.0 - 3.25 - 0.5 - 0.01 - 1.5 - 4.0)
    unknown = parse_phases(phase_line(None, 0.5, {"fingerprint": 0, "verify": 0, "open": 1}), 2.0)
    assert "start" not in unknown and unknown["first image"] == pytest.approx(0.5)
    assert parse_phases("no engines here\n", 5.0) is None


def test_process_age_is_this_process():
    age = process_age()
    assert age is None or 0 < age < 24 * 3600


def test_first_image_line_splits_the_first_image():
    from megafusion.benchmarks.cold_start import first_image_line

    timings = [("text encoders", 0.5), ("stage 1 (1024x1024, 40 steps)", 3.0), ("relay 1->2", 0.25),
               ("stage 2 (2048x2048, 10 steps)", 4.0), ("decode", 1.0)]
    line = first_image_line(timings, 2, 2.5)
    assert line.endswith("(2 graphs captured)")
    output = "\n".join([phase_line(3.0, 0.5, {"fingerprint": 0.0, "verify": 0.0, "open": 1.0}), "wrote x.png", line])
    phases = parse_phases(output, 20.0)
    first = {k.removeprefix("first image/"): v for k, v in phases.items() if k.startswith("first image/")}
    assert first == pytest.approx({"text encoders": 0.5, "stages": 4.5, "relays": 0.25, "graph captures": 2.5,
                                   "decode": 1.0, "png and exit": 15.5 - 8.75})
    assert phases["first image"] == pytest.approx(15.5) and sum(first.values()) == pytest.approx(15.5)
    assert list(parse_phases(output.replace(line, ""), 20.0)) == [*PHASES, "first image"]  # no line, no parts


def test_start_line_splits_the_start():
    from megafusion.benchmarks.cold_start import start_line

    line = start_line(4.0, 1.5, 6.0)
    output = "\n".join([phase_line(6.0, 0.5, {"fingerprint": 0.0, "verify": 0.0, "open": 1.0}), line])
    phases = parse_phases(output, 20.0)
    assert {k: v for k, v in phases.items() if k.startswith("start/")} == pytest.approx(
        {"start/interpreter and imports": 4.0, "start/memory estimate": 1.5, "start/checks": 0.5})
    unknown = start_line(None, 1.5, None)  # no /proc: the ages are not known
    assert unknown == "cold-start start: memory estimate 1.50 s"


def test_saved_line_splits_png_and_exit():
    from megafusion.benchmarks.cold_start import first_image_line, image_on_disk, saved_line

    line = first_image_line([("stage 1 (1024x1024, 40 steps)", 3.0), ("decode", 1.0)], 1, 1.0)
    head = phase_line(3.0, 0.5, {"fingerprint": 0.0, "verify": 0.0, "open": 1.0})
    output = "\n".join([head, line, "wrote x.png", saved_line(0.25, 17.5)])
    phases = parse_phases(output, 20.0)  # first image 15.5: 4.0 in its segments, 11.5 left
    assert phases["first image/png"] == pytest.approx(0.25) and phases["first image/exit"] == pytest.approx(2.5)
    assert phases["first image/other"] == pytest.approx(11.5 - 0.25 - 2.5)
    assert "first image/png and exit" not in phases and image_on_disk(output) == pytest.approx(17.5)
    unknown = "\n".join([head, line, saved_line(0.25, None)])  # no /proc age: the rest stays whole
    assert "first image/png and exit" in parse_phases(unknown, 20.0) and image_on_disk(unknown) is None
    assert image_on_disk(head) is None


def test_bench_report_gives_the_image_on_disk_beside_the_exit():
    import torch

    from megafusion.benchmarks.bench import BenchResult
    from megafusion.benchmarks.timing import environment
    from megafusion.benchmarks.cold_start import ColdStart
    from megafusion.benchmarks.report import markdown

    runs = [ColdStart("engines:aoti", "mf-generate ...", 17.5, 0, 17.1, "", None, 16.8),
            ColdStart("compiled", "mf-generate ...", 40.0, 0, None, "", None, None)]  # printed no saved line
    result = BenchResult("sdxl", {}, environment(torch.device("cpu")), None, None, [], [])
    result.cold_starts = runs
    md = markdown(result)
    assert "| engines:aoti | 17.5 | 16.8 | 0 | 17.1 |" in md and "| compiled | 40.0 | – | 0 | – |" in md


def test_compile_line_reads_back_beside_the_first_image_parts():
    """--mode compiled's compile line gives `compile/<part>` phases, which overlap the first image's stages and so are
    not subtracted from its rest; the cache counts stay out of the seconds."""
    from megafusion.benchmarks.cold_start import compile_line, first_image_line

    seconds = {"tracing": 21.5, "backend": 3.25, "guards": 0.5, "kernel waits": 0.0, "module loads": 1.75}
    line = compile_line(seconds, {"fx graph hit": 3, "fx graph miss": 0, "aot autograd hit": 3, "aot autograd miss": 0})
    first = first_image_line([("stage 1 (1024x1024, 40 steps)", 30.0), ("decode", 1.0)], 1, 28.0)
    base = "\n".join([phase_line(3.0, 0.5, {"fingerprint": 0.0, "verify": 0.0, "open": 2.0}), first])
    without = parse_phases(base, 40.0)
    phases = parse_phases(base + "\n" + line, 40.0)
    assert {k.removeprefix("compile/"): v for k, v in phases.items() if k.startswith("compile/")} == seconds
    assert {k: v for k, v in phases.items() if not k.startswith("compile/")} == without


def test_cache_lines_are_what_the_compiled_path_printed():
    from types import SimpleNamespace

    from megafusion.benchmarks.cold_start import cache_lines
    from megafusion.cli.warm_start import precompile_line

    site = SimpleNamespace(missing="", counters={"traced": 0, "loaded": 5, "saved": 0, "rejected": 0})
    nets = SimpleNamespace(precompiled=[site], precompile_counters=lambda: site.counters)
    printed = precompile_line(nets)
    assert printed == "compiled functions: 5 loaded, 0 traced, 0 saved, 0 rejected"
    out = f"model loaded in 3.0 s\ncompile cache: warm start from /c\n{printed}\ncold-start phases: start 1.00 s"
    assert cache_lines(out) == ("compile cache: warm start from /c", printed)
    site.missing = "torch 2.9 has no aot_compile on compiled functions"
    assert precompile_line(nets).startswith("compiled functions: not kept (torch 2.9")
