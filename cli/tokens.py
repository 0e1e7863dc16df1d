"""`mf-tokens`: writes a prompt's token ids in the file format mf-generate-cpp reads.

mf-tokens --model sdxl [--model-path DIR] --prompt "a fox" [--negative-prompt ""] [--output ids.txt]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..runtime.tokens import format_ids, load_tokenizers
from .common import ArgumentParser, UsageError, run_main, warn_truncated_prompts


def main(argv=None) -> int:
    p = ArgumentParser(prog="mf-tokens", description=__doc__.split("\n\n")[0])
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
        tokenizers = load_tokenizers(args.model, args.model_path)
        warn_truncated_prompts(p.prog, tokenizers, {"--prompt": args.prompt, "--negative-prompt": args.negative_prompt})
        text = format_ids(args.model, tokenizers, args.prompt, args.negative_prompt)
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
