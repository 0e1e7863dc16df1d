"""The built-in CLIP tokenizer (`loading.builtin_tokenizer`'s files) made with the `tokenizers` library alone, for a
start that runs every network from engines: importing transformers for its tokenizer took 1-2.5 s of such a start.

transformers 5's `CLIPTokenizer` is this same `tokenizers.Tokenizer` (BPE with CLIP's normalizer, split pattern and
start/end tokens) behind its own API; `ClipTokenizer` builds it as that class's constructor does and answers the
two calls the runtime makes (`conditioning.token_ids`: padded and truncated to 77 ids; the CLI's truncation warning:
all ids). With an older transformers, whose `CLIPTokenizer` is another implementation, `builtin_clip_tokenizer`
gives transformers' own (tests/core/test_clip_tokenizer.py checks the ids and the tokenizer's definition against
transformers').
"""
from __future__ import annotations

import json
from importlib import resources
from types import SimpleNamespace

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
"""CLIP's pre-tokenization pattern, as transformers' CLIPTokenizer gives it to `tokenizers`."""


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The `tokenizers.Tokenizer` transformers 5's `CLIPTokenizer(vocab, merges)` builds (unk and pad: the end
    token), special tokens added."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    tok.post_processor = processors.RobertaProcessing((EOS, tok.token_to_id(EOS)), (BOS, tok.token_to_id(BOS)),
                                                      False, False)
    return tok


class ClipTokenizer:
    """CLIP token ids from a `tokenizers.Tokenizer`, called as `conditioning.token_ids` and
    `cli.common.warn_truncated_prompts` call transformers' tokenizer."""

    def __init__(self, backend, model_max_length: int = 77):
        self.model_max_length = model_max_length
        self._all = backend
        self._fixed = backend.from_str(backend.to_str())  # a copy that pads and truncates, as transformers sets it
        self._fixed.enable_truncation(max_length=model_max_length, stride=0, strategy="longest_first",
                                      direction="right")
        pad = backend.token_to_id(EOS)
        self._fixed.enable_padding(length=model_max_length, direction="right", pad_id=pad, pad_token=EOS,
                                   pad_type_id=0, pad_to_multiple_of=None)

    def __len__(self) -> int:
        return self._all.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, padding: str | bool = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None, verbose: bool = True):
        if padding == "max_length" and truncation and max_length == self.model_max_length:
            ids = self._fixed.encode(text).ids
        elif not padding and not truncation and max_length is None:
            ids = self._all.encode(text).ids
        else:
            raise ValueError("ClipTokenizer pads and truncates to its model_max_length, or does neither")
        return SimpleNamespace(input_ids=torch.tensor([ids], dtype=torch.int64) if return_tensors == "pt" else ids)


def builtin_clip_tokenizer(model_max_length: int = 77):
    """`loading.builtin_tokenizer()`'s tokenizer, without importing transformers where its CLIPTokenizer is this one
    (transformers 5 and later)."""
    from .loading import builtin_tokenizer, library_version

    if int(library_version("transformers").split(".")[0]) < 5:
        return builtin_tokenizer(model_max_length)
    files = resources.files("megafusion.core") / "assets" / "tiny_tokenizer"
    vocab = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    lines = (files / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    return ClipTokenizer(_clip_backend(vocab, merges), model_max_length)
