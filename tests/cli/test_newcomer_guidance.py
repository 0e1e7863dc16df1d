"""What a newcomer sees: defaults in --help, one warning line where input is cut or meaningless, and a build
that says what it is doing."""
from __future__ import annotations

import re

import pytest

from megafusion.cli import bench as bench_cli
from megafusion.cli import build_engines as build_cli
from megafusion.cli import generate as gen_cli


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help (even inside words) at the terminal's width


def _help(parser) -> str:
    return re.sub(r"\s+", " ", parser.format_help())


def test_generate_help_states_defaults():
    text = _help(gen_cli.build_parser())
    for needle in ("--prompt PROMPT what the image shows (required)",
                   "(default: 7.0); at 1 or below CFG is off",
                   "--seed N noise seed, an integer 0 <= N < 2^64 (default: 0)",
                   "PNG file to write (default: megafusion.png)",
                   "--weights-seed N seed of the random weights (default: 0)",
                   "1 to 8 (default: 2, the paper's)"):
        assert needle in text, needle


def test_build_and_bench_help_state_defaults():
    text = _help(build_cli.build_parser())
    assert "engine backend (default: onnxruntime)" in text
    assert "UNet and text encoder precision (default: fp32)" in text
    assert "--weights-seed N seed of the random weights (default: 0)" in text
    assert "--seed" not in text.replace("--weights-seed", "")  # the old flag is refused, not offered
    text = _help(bench_cli.build_parser())
    assert "(default: tiny-sdxl)" in text and "--variants" in text and "--engines" not in text
    assert "(default: 7.0); at 1 or below CFG is off" in text


def _generate(tmp_path, capsys, *extra):
    out = tmp_path / "o.png"
    rc = gen_cli.main(["--model", "tiny-sd15", "--stages", "128x128:1", "--no-progress", "--output", str(out),
                       *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.is_file()
    return captured.err.strip().splitlines()


def test_long_prompt_warns_how_many_tokens_are_dropped(tmp_path, capsys):
    from megafusion.core.loading import builtin_tokenizer

    prompt = "word " * 100
    n = len(builtin_tokenizer()(prompt, verbose=False).input_ids)
    assert n > 77
    err = _generate(tmp_path, capsys, "--prompt", prompt)
    assert err == [f"mf-generate: warning: --prompt is {n} tokens, the text encoder takes 77: the last {n - 77} "
                   "are dropped"]
    assert _generate(tmp_path, capsys, "--prompt", "a red fox", "--negative-prompt", prompt) == [
        f"mf-generate: warning: --negative-prompt is {n} tokens, the text encoder takes 77: the last {n - 77} "
        "are dropped"]
    assert _generate(tmp_path, capsys, "--prompt", "a red fox") == []


def test_random_weights_on_a_tiny_model_warns(tmp_path, capsys):
    err = _generate(tmp_path, capsys, "--prompt", "x", "--random-weights")
    assert err == ["mf-generate: warning: --random-weights changes nothing: tiny-sd15 always has random weights"]


@pytest.mark.parametrize("backend", ["onnxruntime"])
def test_build_announces_each_export_and_its_time(tmp_path, capsys, backend):
    """Exporting a network takes minutes for real models: each says when it starts and how long it took."""
    argv = ["--model", "tiny-sd15", "--stages", "128x128:1", "--no-dilation", "--device", "cpu", "--backend",
            backend, "--networks", "text_encoder,vae_decoder", "--output", str(tmp_path)]
    assert build_cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("text_encoder-fp32", "vae_decoder-fp32"):
        start = next(i for i, line in enumerate(lines) if name in line and "building for onnxruntime" in line)
        assert lines[start].endswith("...")
        assert re.fullmatch(r"\s+exported ONNX in \d+\.\d s, .* MiB", lines[start + 1])
        assert re.search(rf"{name} .*: done in \d+\.\d s", lines[start + 2])


def test_mf_tokens_warns_of_a_long_prompt_too(tmp_path, capsys):
    from megafusion.cli import tokens as tokens_cli
    from megafusion.core.loading import builtin_tokenizer

    prompt = "word " * 100
    n = len(builtin_tokenizer()(prompt, verbose=False).input_ids)
    assert tokens_cli.main(["--model", "tiny-sd15", "--prompt", prompt, "--output", str(tmp_path / "ids.txt")]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"mf-tokens: warning: --prompt is {n} tokens, the text encoder takes 77: the last {n - 77} are dropped"]
