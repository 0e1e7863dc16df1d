"""The mf-generate run that ends a CUDA build (`mf-build-engines` without --no-warm-up) runs the built plan: the
same model, weights, plan and dtypes, read back through mf-generate's own parser."""
from __future__ import annotations

from megafusion.cli.build_engines import build_parser, warm_up, warm_up_command
from megafusion.cli.common import plan_from_args
from megafusion.cli.generate import build_parser as generate_parser
from megafusion.core.families import FAMILIES


def _generate_args(build_argv: list[str]):
    args = build_parser().parse_args(build_argv)
    cmd = warm_up_command(args, "cuda", "/engines")
    assert cmd[1:3] == ["-m", "megafusion.cli.generate"]
    return args, generate_parser().parse_args(cmd[3:] + ["--output", "x.png"])


def test_the_warm_up_runs_the_built_plan_with_the_built_weights_and_dtypes():
    args, gen = _generate_args(["--model", "sdxl", "--random-weights", "--weights-seed", "7", "--size", "2048x1536",
                                "--precision", "fp16", "--vae-precision", "bf16", "--dilation", "3",
                                "--backend", "aoti", "--output", "/engines"])
    assert (gen.model, gen.engines, gen.device, gen.random_weights, gen.weights_seed) == \
        ("sdxl", "/engines", "cuda", True, "7")
    assert (gen.dtype, gen.vae_dtype, gen.dilation, gen.no_dilation) == ("fp16", "bf16", 3, False)
    family = FAMILIES["sdxl"]
    assert plan_from_args(family, gen.size, gen.stages) == plan_from_args(family, args.size, args.stages)


def test_the_warm_up_of_an_fp8_build_runs_the_fp8_engines():
    """--precision fp8 (not a --dtype): mf-generate then picks the folder's FP8 UNets, in bf16."""
    _, gen = _generate_args(["--model", "sdxl", "--random-weights", "--size", "2048x2048", "--precision", "fp8",
                             "--backend", "aoti", "--output", "/engines"])
    assert (gen.precision, gen.dtype, gen.vae_dtype) == ("fp8", None, None)


def test_the_warm_up_keeps_an_explicit_plan_a_model_folder_and_no_dilation():
    _, gen = _generate_args(["--model", "sd15", "--model-path", "/models/sd15", "--stages",
                             "512x512:30,1024x1024:10", "--no-dilation", "--output", "/engines"])
    assert (gen.model_path, gen.stages, gen.size, gen.no_dilation, gen.random_weights) == \
        ("/models/sd15", "512x512:30,1024x1024:10", None, True, False)


def test_no_warm_up_off_cuda_or_when_asked(capsys):
    warm_up(build_parser().parse_args(["--model", "tiny-sd15", "--output", "/e"]), "cpu", "/e")
    warm_up(build_parser().parse_args(["--model", "tiny-sd15", "--output", "/e", "--no-warm-up"]), "cuda", "/e")
    assert "warm-up" not in capsys.readouterr().out
