"""A T5 tokenizer and encoder config for tiny models, built in code: no files, no downloads.

Real T5 models (DeepFloyd IF, SD3, FLUX) load their own SentencePiece tokenizer from the model folder. The
tiny models need one that fits their embedding table: a Unigram model over a small fixed vocabulary, with
T5's special ids (pad 0, eos 1, unk 2), its "▁" word prefix, and an eos appended to every sequence.
"""
from __future__ import annotations

import string
from typing import Any

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_SPECIALS = ("<pad>", "</s>", "<unk>")
_WORDS = (
    "a an the of and in on with at to for from by is are photo picture painting drawing image of red green "
    "blue yellow black white orange purple pink brown gray fox cat dog bird horse cube sphere house tree "
    "flower car boat lighthouse mountain river sea sky sun moon city street forest field beach night day "
    "small large big tiny old new bright dark high resolution detailed style portrait landscape"
).split()


def _pieces() -> list[tuple[str, float]]:
    # Whole words score higher than spelling them out, so known words are one token; anything else falls
    # back to single characters (ASCII letters, digits and punctuation), and only other characters are unk.
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in _SPECIALS]
    seen = set(_SPECIALS)
    for w in dict.fromkeys(_WORDS):
        pieces.append((f"\u2581{w}", -2.0))
        seen.add(f"\u2581{w}")
    for c in ["\u2581", *string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]:
        if c not in seen:
            pieces.append((c, -10.0))
            seen.add(c)
    return pieces


def tiny_t5_tokenizer(model_max_length: int):
    """A `transformers.PreTrainedTokenizerFast` that tokenizes as T5 does (ids, eos, padding), over a fixed
    vocabulary of about 170 pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram(_pieces(), unk_id=UNK_ID, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_vocab_size() -> int:
    return len(_pieces())


def tiny_t5_config(**overrides: Any) -> dict[str, Any]:
    """`T5Config` keyword arguments for a small `T5EncoderModel` whose vocabulary is the tiny tokenizer's."""
    cfg: dict[str, Any] = {
        "vocab_size": tiny_vocab_size(),
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
        "feed_forward_proj": "gated-gelu",  # T5 v1.1, as IF's t5-v1_1-xxl
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "use_cache": False,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "decoder_start_token_id": PAD_ID,
    }
    cfg.update(overrides)
    return cfg
