"""The mf-build-engines command a refusal prints rebuilds what the run needs: run as printed, the folder serves
the run (the same weights source, seed, device and fusion target), and the seed of random weights is one flag,
--weights-seed, in every tool."""
from __future__ import annotations

import shlex
import shutil

import pytest

from megafusion.cli import build_engines as build_cli
from megafusion.core.loading import load_model
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine.cache import EngineError
from megafusion.engine.load import build_command, open_engines

from tests.engines import STAGES


def _printed_command(err: EngineError) -> list[str]:
    text = str(err)
    return shlex.split(text[text.index("mf-build-engines "):])


def _run_as_printed(argv: list[str], capsys) -> str:
    assert argv[0] == "mf-build-engines"
    assert build_cli.main(argv[1:]) == 0
    return capsys.readouterr().out


def test_random_seed_hint_builds_engines_the_run_accepts(tmp_path, capsys):
    bundle = load_model("tiny-sd15", seed=3)
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    with pytest.raises(EngineError, match="no tiny-sd15 engines") as e:
        open_engines(tmp_path, bundle, plan, dilation=1)
    argv = _printed_command(e.value)
    assert argv[argv.index("--weights-seed") + 1] == "3" and "--random-weights" not in argv  # tiny: always random
    assert argv[argv.index("--device") + 1] == "cpu" and argv[argv.index("--ort-optimize") + 1] == "none"
    assert "4 built, 0 up to date" in _run_as_printed(argv, capsys)
    open_engines(tmp_path, bundle, plan, dilation=1)  # the folder now serves this run


def test_stale_weights_hint_names_the_model_folder(tmp_path, sd15_engines, capsys):
    from tests.core.test_loading import _save

    _save(load_model("tiny-sd15", seed=5), tmp_path / "my model")  # a space: the command must quote it
    bundle = load_model("tiny-sd15", model_path=str(tmp_path / "my model"))
    engines = tmp_path / "engines"
    shutil.copytree(sd15_engines, engines)  # built from the default random weights
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    with pytest.raises(EngineError, match="other weights") as e:
        open_engines(engines, bundle, plan)
    argv = _printed_command(e.value)
    assert argv[argv.index("--model-path") + 1] == str(tmp_path / "my model")
    assert "5 built, 0 up to date" in _run_as_printed(argv, capsys)  # every network had other weights
    open_engines(engines, bundle, plan)


def test_build_command_for_real_models():
    from types import SimpleNamespace

    from megafusion.core.families import SDXL

    plan = validate_plan(SDXL, parse_stages("1024x1024:40,2048x2048:10"))
    random7 = SimpleNamespace(family=SDXL, source="random:7")
    assert build_command(random7, plan, "onnxruntime", "fp16", 2, "eng dir", "cuda", "cuda") == (
        "mf-build-engines --model sdxl --random-weights --weights-seed 7 --stages 1024x1024:40,2048x2048:10 "
        "--backend onnxruntime --precision fp16 --device cuda --ort-optimize cuda --output 'eng dir'")
    hub = SimpleNamespace(family=SDXL, source=SDXL.hub_id)  # the default weights need no flag
    assert build_command(hub, plan, "tensorrt", "fp16", 1, "e", "cuda:1") == (
        "mf-build-engines --model sdxl --stages 1024x1024:40,2048x2048:10 --backend tensorrt --precision fp16 "
        "--no-dilation --device cuda --output e")
    assert "--random-weights --stages" in build_command(SimpleNamespace(family=SDXL, source="random:0"), plan,
                                                        "aoti", "fp16", 2, "e")


def test_build_engines_old_seed_flag_points_to_weights_seed(tmp_path, capsys):
    argv = ["--model", "tiny-sdxl", "--seed", "3", "--output", str(tmp_path / "e")]
    assert build_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mf-build-engines: error: --seed 3:")
    assert "--weights-seed 3" in err and not (tmp_path / "e").exists()


def test_generate_takes_the_weights_seed_engines_were_built_with(tmp_path, capsys):
    """Engines of `--weights-seed 2` serve mf-generate --weights-seed 2 (there was no such flag: they could
    never be used)."""
    from megafusion.cli import generate as gen_cli

    eng = tmp_path / "e"
    build = ["--model", "tiny-sd15", "--stages", STAGES, "--backend", "torch", "--device", "cpu", "--no-dilation"]
    assert build_cli.main([*build, "--weights-seed", "2", "--output", str(eng)]) == 0
    gen = ["--model", "tiny-sd15", "--stages", STAGES, "--no-dilation", "--prompt", "x", "--no-progress",
           "--engines", str(eng), "--output", str(tmp_path / "o.png")]
    assert gen_cli.main([*gen, "--weights-seed", "2"]) == 0
    capsys.readouterr()
    assert gen_cli.main(gen) == 2
    assert "--weights-seed 2" not in capsys.readouterr().err  # seed 0 was asked: the hint is for seed 0
