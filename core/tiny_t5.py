"""A T5 tokenizer and encoder config for the tiny models, built in code: no files, no downloads.

The real T5 vocabulary (a 32k SentencePiece model) cannot be downloaded here; for random weights any fixed
tokenizer whose ids fit the embedding table gives the same cost and the same code path. Ids follow T5's
numbering of its special tokens (pad 0, eos 1, unk 2); text is lower-cased and split into characters, each word
starting with a "▁"-marked one, as SentencePiece marks word starts; every sequence ends with eos, as T5's does.
"""
from __future__ import annotations

import string
from typing import Any

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_RESERVED_TOKENS = ("<pad>", "</s>", "<unk>")
_CHARS = string.ascii_lowercase + string.digits + string.punctuation
_PIECES = _RESERVED_TOKENS + ("\u2581",) + tuple("\u2581" + c for c in _CHARS) + tuple(_CHARS)

TINY_T5_VOCAB_SIZE = len(_PIECES)
"""Ids the built-in tokenizer gives: 0 .. TINY_T5_VOCAB_SIZE - 1."""


def tiny_t5_tokenizer(model_max_length: int):
    """A `transformers.PreTrainedTokenizerFast` over the fixed vocabulary above (a `tokenizers` Unigram model)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Word-start pieces score above bare characters, so "▁a" is one token rather than "▁" + "a".
    vocab = [(p, 0.0) for p in _RESERVED_TOKENS] + [(p, -1.0) for p in _PIECES[len(_RESERVED_TOKENS):]]
    tok = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def tiny_t5_config(**overrides: Any) -> dict[str, Any]:
    """`T5EncoderModel` config (as keyword arguments of `T5Config`) at small widths, in T5 v1.1's layout (gated
    GELU, as SD3's and FLUX's T5-XXL); `overrides` replace any entry (e.g. `d_model` to match a transformer)."""
    cfg: dict[str, Any] = {
        "vocab_size": TINY_T5_VOCAB_SIZE,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "decoder_start_token_id": PAD_ID,
        "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    return cfg


def tiny_vocab_size() -> int:
    """TINY_T5_VOCAB_SIZE, as a function (what the IF family reads)."""
    return TINY_T5_VOCAB_SIZE
