"""core/clip_tokenizer.py: the built-in tokenizer made with `tokenizers` alone is transformers' CLIPTokenizer, by
its definition and by the ids it gives, and imports no transformers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megafusion.core.clip_tokenizer import ClipTokenizer, builtin_clip_tokenizer
from megafusion.core.loading import builtin_tokenizer
from megafusion.runtime.conditioning import token_ids

PROMPTS = ("a red fox", "", "A  Lighthouse,\tat DUSK!! 'twas café", "naïve 東京 😀 x<|endoftext|>y", "x " * 100,
           "don't   stop\n\nme NOW 123,456.7")
"""Case, runs of white space, accents, other scripts, a special token in the text, truncation, digits."""


def test_same_definition_and_ids_as_transformers():
    ours, theirs = builtin_clip_tokenizer(), builtin_tokenizer()
    assert isinstance(ours, ClipTokenizer)
    assert json.loads(ours._all.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert len(ours) == len(theirs) == 514 and ours.model_max_length == theirs.model_max_length == 77
    for p in PROMPTS:
        got, want = token_ids(ours, p, "cpu"), token_ids(theirs, p, "cpu")
        assert got.dtype == want.dtype == torch.int64 and torch.equal(got, want), p
        assert ours(p).input_ids == theirs(p, verbose=False).input_ids  # all ids: the truncation warning's count
    assert len(ours("x " * 100).input_ids) == 102  # longer than 77: the warning has something to count


def test_other_calls_are_refused():
    with pytest.raises(ValueError, match="model_max_length"):
        builtin_clip_tokenizer()("a", padding="max_length", max_length=20, truncation=True)


def test_an_older_transformers_gets_its_own_tokenizer(monkeypatch):
    monkeypatch.setattr("megafusion.core.loading.library_version", lambda name: "4.46.3")
    assert not isinstance(builtin_clip_tokenizer(), ClipTokenizer)


def test_imports_no_transformers():
    code = ("import sys; from megafusion.core.clip_tokenizer import builtin_clip_tokenizer; "
            "builtin_clip_tokenizer()('a fox'); print('transformers' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "False"
