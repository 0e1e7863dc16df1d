"""Prints a prompt's token ids for libmegafusion and `mf-generate-cpp` (which take ids, not text), in the
file format mf-generate-cpp reads: one line per text encoder, `prompt I id id ...`, then `negative I ...`.

python -m megafusion.runtime.tokens --model sdxl [--model-path DIR] --prompt "a fox" [--negative-prompt ""] \
    [--output ids.txt]

Tokenization is the Python runtime's own (`conditioning.token_ids`): padded to 77 and truncated. An empty
negative prompt on SDXL writes no negative lines (the runtime uses zero embeddings there); on SD1.5 it writes
the empty prompt's ids, which the runtime encodes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megafusion.export.cli_common import UsageError, run_main
from megafusion.export.loading import builtin_tokenizer
from megafusion.export.models import get_family

from .conditioning import token_ids


def load_tokenizers(model: str, model_path: str | None = None) -> list:
    """The tokenizers of `model`: the folder's (`tokenizer`, `tokenizer_2`) or, for random weights, the
    built-in one that `build_random` gives every encoder."""
    family = get_family(model)
    n = len(family.text_encoders)
    if model_path is None:
        return [builtin_tokenizer() for _ in range(n)]
    from transformers import CLIPTokenizer

    root = Path(model_path)
    names = ["tokenizer", "tokenizer_2"][:n]
    missing = [name for name in names if not (root / name).is_dir()]
    if missing:
        raise UsageError(f"{root} lacks the tokenizer folder(s) {', '.join(missing)}")
    return [CLIPTokenizer.from_pretrained(root / name) for name in names]


def format_ids(model: str, tokenizers: list, prompt: str, negative_prompt: str = "") -> str:
    lines = [f"# megafusion token ids: model {model}, prompt {prompt!r}, negative {negative_prompt!r}"]
    for i, tok in enumerate(tokenizers):
        lines.append(f"prompt {i} " + " ".join(str(int(t)) for t in token_ids(tok, prompt, "cpu")[0]))
    if negative_prompt or not get_family(model).is_xl:
        for i, tok in enumerate(tokenizers):
            lines.append(f"negative {i} " + " ".join(str(int(t)) for t in token_ids(tok, negative_prompt, "cpu")[0]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megafusion.runtime.tokens", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model family (sd15, sdxl, tiny-sd15, tiny-sdxl)")
    p.add_argument("--model-path", help="diffusers folder whose tokenizers to use (default: the built-in one "
                                        "that random-weight builds use)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--output", help="write the ids to this file instead of standard output")

    args = p.parse_args(argv)

    def body() -> int:
        if args.output and not Path(args.output).parent.is_dir():
            raise UsageError(f"output folder {str(Path(args.output).parent)!r} does not exist")
        text = format_ids(args.model, load_tokenizers(args.model, args.model_path), args.prompt,
                          args.negative_prompt)
        if args.output:
            out = Path(args.output)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, out)  # never a half-written ids file under the requested name
            finally:
                tmp.unlink(missing_ok=True)
        else:
            sys.stdout.write(text)
        return 0

    return run_main(p.prog, body)


if __name__ == "__main__":
    raise SystemExit(main())
