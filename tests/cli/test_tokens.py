"""`mf-tokens`: the ids file mf-generate-cpp reads holds the runtime's own token ids
(77 per encoder), negative lines exactly where the runtime encodes a negative prompt, and bad input exits 2
naming the value without writing anything."""
from __future__ import annotations

from megafusion.runtime.conditioning import token_ids
from megafusion.cli.tokens import main
from megafusion.runtime.tokens import load_tokenizers


def _lines(path):
    return [ln.split() for ln in path.read_text().splitlines() if not ln.startswith("#")]


def test_ids_are_the_runtime_tokenization(tiny_sdxl, tmp_path):
    out = tmp_path / "ids.txt"
    assert main(["--model", "tiny-sdxl", "--prompt", "a red cube", "--output", str(out)]) == 0
    lines = _lines(out)
    assert [ln[:2] for ln in lines] == [["prompt", "0"], ["prompt", "1"]]  # empty negative on SDXL: zeros, no ids
    for (_, i, *ids), tok in zip(lines, tiny_sdxl.tokenizers):
        assert [int(x) for x in ids] == token_ids(tok, "a red cube", "cpu")[0].tolist()
        assert len(ids) == 77
    assert main(["--model", "tiny-sdxl", "--prompt", "a", "--negative-prompt", "blurry", "--output", str(out)]) == 0
    assert [ln[0] for ln in _lines(out)] == ["prompt", "prompt", "negative", "negative"]


def test_sd15_always_writes_negative_ids(tmp_path):
    out = tmp_path / "ids.txt"
    assert main(["--model", "tiny-sd15", "--prompt", "a", "--output", str(out)]) == 0
    (_, _, *neg) = _lines(out)[1]
    assert [int(x) for x in neg] == token_ids(load_tokenizers("tiny-sd15")[0], "", "cpu")[0].tolist()


def test_bad_input_exits_2_naming_it(tmp_path, capsys):
    assert main(["--model", "sd9", "--prompt", "a"]) == 2
    assert "'sd9'" in capsys.readouterr().err
    missing = tmp_path / "nope" / "ids.txt"
    assert main(["--model", "tiny-sd15", "--prompt", "a", "--output", str(missing)]) == 2
    assert str(missing.parent) in capsys.readouterr().err
    assert not missing.parent.exists()
