"""`mf-generate --model tiny-if`: the IF path through the CLI (short plans, CPU)."""
from __future__ import annotations

import pytest
from PIL import Image

from megafusion.cli.generate import main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_if_writes_the_stage_two_image(tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["--model", "tiny-if", "--prompt", "a red fox", "--stages", "16x16:3,32x32:2",
                 "--stages-2", "64x64:2,128x128:1", "--seed", "1", "--output", str(out)]) == 0
    assert Image.open(out).size == (128, 128)
    text = capsys.readouterr().out
    assert "stage II.2 (128x128, 1 steps)" in text and "wrote" in text


@pytest.mark.parametrize("extra, message", [
    (["--size", "64x64"], "--size does not apply to tiny-if"),
    (["--stages", "18x18:3"], "multiples of 4"),
    (["--stages-2", " "], "--stages-2 ' ': give at least one stage"),
    (["--relay", "latent"], "its relay is in pixels"),
    (["--guidance-2", "nan"], "--guidance-2"),
    (["--stage-2-path", "/nowhere"], "--stage-2-path needs --model-path"),
    ([], "--model if needs --model-path DIR (an IFPipeline folder) or --random-weights"),
])
def test_bad_input_is_one_line_and_no_file(tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    model = "if" if "--model-path DIR" in message else "tiny-if"
    assert main(["--model", model, "--prompt", "x", "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_mode_other_than_eager_needs_cuda(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["--model", "tiny-if", "--prompt", "x", "--mode", "graphs", "--device", "cpu",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--mode graphs needs a CUDA device (got cpu)") and len(err.splitlines()) == 1
    assert not out.exists()


def test_engines_built_then_generated_from(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from megafusion.cli.build_engines import main as build_main

    plans = ["--stages", "16x16:3,32x32:2", "--stages-2", "64x64:2,128x128:1"]
    eng = tmp_path / "eng"
    assert build_main(["--model", "tiny-if", *plans, "--backend", "onnxruntime", "--device", "cpu",
                       "--output", str(eng)]) == 0
    assert "4 built" in capsys.readouterr().out
    torch_png, eng_png = tmp_path / "torch.png", tmp_path / "eng.png"
    assert main(["--model", "tiny-if", "--prompt", "a red fox", *plans, "--output", str(torch_png)]) == 0
    assert main(["--model", "tiny-if", "--prompt", "a red fox", *plans, "--engines", str(eng),
                 "--output", str(eng_png)]) == 0
    assert "engines: onnxruntime in" in capsys.readouterr().out
    import numpy as np

    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (torch_png, eng_png))
    assert a.shape == b.shape == (128, 128, 3) and np.abs(a - b).max() <= 8  # samples within 7e-4 relative
    assert a.std() > 1.0


@pytest.mark.parametrize("prog, extra, message", [
    ("generate", ["--engines", "/nowhere", "--dtype", "bf16"], "--dtype bf16: IF engines are fp32 or fp16"),
    ("generate", ["--engines", "/nowhere"], "/nowhere holds no tiny-if UNet engines for cpu"),
    ("build", ["--backend", "tensorrt"], "tiny-if engines are built by onnxruntime or aoti"),
    ("build", ["--vae-precision", "fp16"], "--vae-precision does not apply to tiny-if"),
    ("build", ["--guidance", "7"], "--guidance does not apply to tiny-if"),
])
def test_engine_refusals_are_one_line(tmp_path, capsys, prog, extra, message):
    from megafusion.cli.build_engines import main as build_main

    if prog == "generate":
        code = main(["--model", "tiny-if", "--prompt", "x", "--output", str(tmp_path / "x.png"), *extra])
    else:
        code = build_main(["--model", "tiny-if", "--device", "cpu", "--output", str(tmp_path / "e"), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_latent_build_refuses_stage_two_flags(tmp_path, capsys):
    from megafusion.cli.build_engines import main as build_main

    assert build_main(["--model", "tiny-sd15", "--stages-2", "64x64:2", "--output", str(tmp_path)]) == 2
    assert "apply to IF models (tiny-if, if) only" in capsys.readouterr().err


def test_mf_bench_tiny_if(tmp_path, capsys):
    import json

    from megafusion.cli.bench import main as bench_main

    assert bench_main(["--model", "tiny-if", "--device", "cpu", "--repeats", "1", "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "if_megafusion.json").read_text())["rows"]
    assert {(r["mode"], r["cascade"], r["kind"]) for r in rows} == {
        ("eager", c, k) for c in ("I", "II") for k in ("direct", "megafusion")}
    assert all(r["true_tflop"] > 0 and r["speedup_vs_direct"] > 0 for r in rows)
    assert "| fp32 | eager | II megafusion |" in (tmp_path / "if_megafusion.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--stages", "16x16:2"], "--stages does not apply to tiny-if"),
    (["--variants", "fast"], "unknown 'fast'"),
    (["--variants", "eager,engines:aoti", "--engine-dir", "/x"], "an engines variant runs alone"),
    (["--variants", "engines:aoti"], "--variants engines:<backend> and --engine-dir DIR go together"),
    (["--variants", "compiled"], "--variants compiled needs a CUDA device here"),
])
def test_mf_bench_tiny_if_refusals(tmp_path, capsys, extra, message):
    from megafusion.cli.bench import main as bench_main

    assert bench_main(["--model", "tiny-if", "--device", "cpu", "--output", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
