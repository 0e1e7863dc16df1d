"""Bad input to mf-generate, mf-bench and mf-build-engines: one line `prog: error: ...` naming the value, exit
status 2, before anything is loaded (the model loader is replaced by one that fails the test), nothing written.

Unwritable folders: the tests run as root, which ignores permission bits, so they use a path under a regular
file (a real failure for everyone) and, for a folder that refuses writes, a `tempfile.mkstemp` that raises
EACCES (the tools' probe creates and removes a temp file there)."""
from __future__ import annotations

import errno
import tempfile

import pytest

from megafusion.cli import bench as bench_cli
from megafusion.cli import generate as gen_cli

from tests.cli.refusals import TOOLS
from tests.cli.refusals import refused as _refused

pytestmark = pytest.mark.usefixtures("no_model_load")  # every case is refused before the model load


GEN = ["--model", "tiny-sdxl", "--prompt", "x", "--no-progress", "--stages", "128x128:1"]
BENCH = ["--model", "tiny-sd15", "--device", "cpu", "--steps", "4"]
BUILD = ["--model", "tiny-sd15", "--device", "cpu", "--stages", "128x128:1"]

SEED_ERR = "must be an integer 0 <= seed < 2^64"
GUIDANCE_ERR = "must be a finite number >= 0"

SHARED_BAD = [  # (args, needles) that every tool that takes the flag refuses alike
    (["--seed", "18446744073709551616"], ["--seed '18446744073709551616': " + SEED_ERR]),
    (["--seed", "-1"], ["--seed '-1': " + SEED_ERR]),
    (["--seed", "1_0"], ["--seed '1_0': " + SEED_ERR]),
    (["--seed", "abc"], ["--seed 'abc': " + SEED_ERR]),
    (["--guidance", "nan"], ["--guidance 'nan': " + GUIDANCE_ERR]),
    (["--guidance", "inf"], ["--guidance 'inf': " + GUIDANCE_ERR]),
    (["--guidance", "-1"], ["--guidance '-1': " + GUIDANCE_ERR]),
    (["--guidance", "1e39"], ["--guidance '1e39': " + GUIDANCE_ERR]),  # infinite as a float32
    (["--guidance", "seven"], ["--guidance 'seven': " + GUIDANCE_ERR]),
    (["--dilation", "1000"], ["--dilation 1000: must be at most 8", "the paper uses 2",
                              "3x3 kernel's taps lie farther apart than SD1.5's 8x8 native mid-block map"]),
    (["--dilation", "0"], ["--dilation 0: must be at least 1"]),
    (["--weights-seed", "-1"], ["--weights-seed '-1': must be an integer 0 <= weights-seed < 2^64"]),
]


@pytest.mark.parametrize("args, needles", SHARED_BAD + [
    (["--stages", ""], ["--stages '': give at least one stage"]),
    (["--size", ""], ["malformed size ''"]),
    (["--no-dilation", "--dilation", "5"], ["--no-dilation and --dilation 5 contradict each other"]),
    (["--output", "out.jpg"], ["--output 'out.jpg'", "give a name ending in .png, not '.jpg'"]),
    (["--output", "out"], ["--output 'out'", "not 'no suffix'"]),
    (["--output", ""], ["--output '': give a file name"]),
    (["--model", "tiny-sd15", "--model-path", "m", "--random-weights"], ["--model-path and --random-weights"]),
    (["--model", "sdxl", "--weights-seed", "3"], ["--weights-seed 3: only random weights have a seed"]),
])
def test_generate_refuses(args, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused("mf-generate", [*GEN, *args], capsys, *needles)
    assert list(tmp_path.iterdir()) == []


def test_generate_output_that_is_a_folder_or_under_a_file(tmp_path, capsys):
    _refused("mf-generate", [*GEN, "--output", str(tmp_path)], capsys, f"--output {str(tmp_path)!r} is a folder")
    (tmp_path / "somefile").write_text("a file, not a folder")
    bad = str(tmp_path / "somefile" / "out.png")
    _refused("mf-generate", [*GEN, "--output", bad], capsys,
             f"--output {bad!r}: {str(tmp_path / 'somefile')!r} is a file, not a folder")


def _unwritable(monkeypatch):
    def mkstemp(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_generate_output_in_an_unwritable_folder(tmp_path, capsys, monkeypatch):
    _unwritable(monkeypatch)
    out = str(tmp_path / "o.png")
    _refused("mf-generate", [*GEN, "--output", out], capsys,
             f"--output {out!r}: cannot write in {str(tmp_path)!r} (Permission denied)")


@pytest.mark.parametrize("args, needles", SHARED_BAD + [
    (["--stages", ""], ["--stages '': give at least one stage"]),
    (["--variants", "graphs"], ["--variants graphs: graphs needs a CUDA device (got cpu)"]),
    (["--variants", "torch,compiled,graphs"], ["compiled and graphs need a CUDA device"]),
    (["--variants", "torch,eager"], ["unknown variant(s) 'eager'"]),
    (["--engines", "graphs"], ["--engines graphs:", "--variants graphs"]),
    (["--peak-tflops", "-1"], ["--peak-tflops -1: must be a finite number > 0"]),
    (["--peak-tflops", "0"], ["--peak-tflops 0: must be a finite number > 0"]),
    (["--peak-tflops", "nan"], ["--peak-tflops nan: must be a finite number > 0"]),
])
def test_bench_refuses(args, needles, capsys, tmp_path):
    _refused("mf-bench", [*BENCH, "--output", str(tmp_path / "out"), *args], capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_bench_output_that_is_a_file_or_unwritable(tmp_path, capsys, monkeypatch):
    f = tmp_path / "results"
    f.write_text("a file")
    _refused("mf-bench", [*BENCH, "--output", str(f)], capsys, f"--output {str(f)!r} exists and is not a folder")
    _refused("mf-bench", [*BENCH, "--output", str(f / "sub")], capsys, f"{str(f)!r} is a file, not a folder")
    _unwritable(monkeypatch)
    _refused("mf-bench", [*BENCH, "--output", str(tmp_path / "new" / "dir")], capsys,
             f"cannot write in {str(tmp_path)!r}")


def test_bench_defaults_to_the_tiny_model_like_mf_generate():
    args = bench_cli.build_parser().parse_args(["--output", "x"])
    assert args.model == "tiny-sdxl" == gen_cli.build_parser().parse_args(["--prompt", "x"]).model


@pytest.mark.parametrize("args, needles", [a for a in SHARED_BAD if a[0][0] in ("--dilation", "--weights-seed")] + [
    (["--stages", ""], ["--stages '': give at least one stage"]),
    (["--no-dilation", "--dilation", "5"], ["--no-dilation and --dilation 5 contradict each other"]),
    (["--model-path", "m", "--random-weights"], ["--model-path and --random-weights"]),
])
def test_build_engines_refuses(args, needles, capsys, tmp_path):
    _refused("mf-build-engines", [*BUILD, "--output", str(tmp_path / "e"), *args], capsys, *needles)
    assert not (tmp_path / "e").exists()


def test_build_engines_output_under_a_file_unwritable_or_empty(tmp_path, capsys, monkeypatch):
    (tmp_path / "somefile").write_text("a file")
    bad = str(tmp_path / "somefile" / "engines")
    _refused("mf-build-engines", [*BUILD, "--output", bad], capsys,
             f"--output {bad!r}: {str(tmp_path / 'somefile')!r} is a file, not a folder")
    _refused("mf-build-engines", [*BUILD, "--output", ""], capsys, "--output '': give a folder name")
    _unwritable(monkeypatch)
    _refused("mf-build-engines", [*BUILD, "--output", str(tmp_path / "e")], capsys,
             f"--output {str(tmp_path / 'e')!r}: cannot write in {str(tmp_path)!r} (Permission denied)")


def test_generate_compile_cache_that_is_a_file(tmp_path, capsys):
    bad = tmp_path / "cc"
    bad.write_text("a file")
    argv = [*GEN, "--mode", "compiled", "--compile-cache", str(bad), "--output", str(tmp_path / "o.png")]
    _refused("mf-generate", argv, capsys, f"--compile-cache {str(bad)!r} exists and is not a folder")


def test_generate_engines_folder_that_does_not_exist(tmp_path, capsys):
    missing = str(tmp_path / "no-engines")
    _refused("mf-generate", [*GEN, "--engines", missing, "--output", str(tmp_path / "o.png")], capsys,
             f"--engines {missing!r}: no such folder")


@pytest.mark.parametrize("prog, argv, needle", [
    ("mf-generate", [*GEN, "--dilation", "abc"], "argument --dilation: invalid int value: 'abc'"),
    ("mf-generate", [*GEN, "--stesp", "4"], "unrecognized arguments: --stesp 4"),
    ("mf-bench", [*BENCH, "--repeats", "many", "--output", "x"], "argument --repeats: invalid int value: 'many'"),
    ("mf-build-engines", [*BUILD, "--precision", "int8", "--output", "x"], "argument --precision: invalid choice: 'int8'"),
    ("mf-build-engines", ["--output", "x"], "the following arguments are required: --model"),
])
def test_argparse_errors_are_one_line_too(prog, argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        TOOLS[prog](argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"{prog}: error: {needle}"), err
