"""A prompt's token ids for libmegafusion and `mf-generate-cpp` (which take ids, not text), in the file format
mf-generate-cpp reads: one line per text encoder, `prompt I id id ...`, then `negative I ...` (written by
`mf-tokens`, megafusion.cli.tokens).

Tokenization is the Python runtime's own (`conditioning.token_ids`): padded to 77 and truncated. An empty
negative prompt on SDXL writes no negative lines (the runtime uses zero embeddings there); on SD1.5 it writes
the empty prompt's ids, which the runtime encodes.
"""
from __future__ import annotations

from pathlib import Path

from ..core.loading import WeightsError, builtin_tokenizer
from ..core.families import get_family

from .conditioning import token_ids


def load_tokenizers(model: str, model_path: str | None = None) -> list:
    """The tokenizers of `model`: the folder's (`tokenizer`, `tokenizer_2`) or, for random weights, the
    built-in one that `build_random` gives every encoder."""
    family = get_family(model)
    from ..core.dit_families import refuse_dit

    refuse_dit(family, "mf-tokens")  # SD3/FLUX also need T5 ids
    n = len(family.text_encoders)
    if model_path is None:
        return [builtin_tokenizer() for _ in range(n)]
    from transformers import CLIPTokenizer

    root = Path(model_path)
    names = ["tokenizer", "tokenizer_2"][:n]
    missing = [name for name in names if not (root / name).is_dir()]
    if missing:
        raise WeightsError(f"{root} lacks the tokenizer folder(s) {', '.join(missing)}")
    return [CLIPTokenizer.from_pretrained(root / name) for name in names]


def format_ids(model: str, tokenizers: list, prompt: str, negative_prompt: str = "") -> str:
    lines = [f"# megafusion token ids: model {model}, prompt {prompt!r}, negative {negative_prompt!r}"]
    for i, tok in enumerate(tokenizers):
        lines.append(f"prompt {i} " + " ".join(str(int(t)) for t in token_ids(tok, prompt, "cpu")[0]))
    if negative_prompt or not get_family(model).is_xl:
        for i, tok in enumerate(tokenizers):
            lines.append(f"negative {i} " + " ".join(str(int(t)) for t in token_ids(tok, negative_prompt, "cpu")[0]))
    return "\n".join(lines) + "\n"
