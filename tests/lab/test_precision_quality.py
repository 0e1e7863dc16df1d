"""benchmarks/lab/precision_quality.py on the CPU: tiny-sd15 in fp32 (the reference), bf16, FP8 per token and FP8
with static scales, judged by a tiny random CLIP model. Random weights: the numbers show the plumbing, not quality."""
from __future__ import annotations

import json

import pytest

import precision_quality

from tests.benchmarks.test_quality import save_tiny_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    save_tiny_clip(folder)
    return folder


def test_four_variants_against_fp32(tmp_path, clip):
    out = tmp_path / "q"
    assert precision_quality.main(["--model", "tiny-sd15", "--clip", str(clip), "--device", "cpu", "--variants",
                                   "fp32,bf16,fp8,fp8-static", "--count", "3", "--stages", "128x128:2,192x192:1",
                                   "--output", str(out)]) == 0
    data = json.loads((out / "precision-quality.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["fp32", "bf16", "fp8", "fp8-static"] and data["prompts"] == list(precision_quality.PROMPTS[:3])
    assert "fd_clip_to_reference" not in rows["fp32"]
    for name in ("bf16", "fp8", "fp8-static"):
        r = rows[name]
        assert r["images"] == 3 and 0 <= r["clip_score"] <= 100 and r["fd_clip_to_reference"] >= 0
        assert r["paired"]["max_levels"] > 0  # a lower precision moved some pixel
    assert rows["fp8"]["paired"] != rows["fp8-static"]["paired"]  # the static scales were in use
    assert (out / "fp8-static-0.png").is_file() and "| fp8-static |" in (out / "precision-quality.md").read_text()


@pytest.mark.parametrize("flags,said", [(["--variants", "bf16,fp32"], "the reference (first) must come first"),
                                        (["--variants", "fp16"], "name at least two"),
                                        (["--variants", "fp16,int4"], "unknown int4"),
                                        (["--stages", "128x128:2,160x160:1"], "height 160 is not a positive multiple")])
def test_refusals(tmp_path, clip, capsys, flags, said):
    with pytest.raises(SystemExit):
        precision_quality.main(["--model", "tiny-sd15", "--clip", str(clip), "--device", "cpu", *flags,
                                "--output", str(tmp_path)])
    assert said in capsys.readouterr().err


def test_unreadable_inputs_refused_in_one_line(tmp_path, clip, capsys):
    for flags, said in ((["--prompts", str(tmp_path / "none.txt")], "--prompts"),
                        (["--clip", str(tmp_path)], "not a CLIP model folder")):
        args = ["--model", "tiny-sd15", "--clip", str(clip), "--device", "cpu", "--output", str(tmp_path / "o")]
        with pytest.raises(SystemExit):
            precision_quality.main(args + flags)
        assert said in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
