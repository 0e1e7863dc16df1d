"""`mf-generate --engines` whose engines run every network imports no diffusers or transformers model module (issue
#15: about 9 s of an SDXL cold start) and writes the same PNG, byte for byte, as the start that built the meta-device
modules."""
from __future__ import annotations

import json
import subprocess
import sys

from megafusion.cli.generate import main

from tests.engines import STAGES

DRIVER = """
import json, sys
from megafusion.cli.generate import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
"""

NOT_IMPORTED = ("diffusers", "transformers", "torch._inductor", "torch._dynamo")
"""Module prefixes a start from random-weights engines does without: diffusers whole (its import alone pulls in
torch._dynamo), transformers (its tokenizer is core/clip_tokenizer.py's) and, for aoti packages, Inductor."""


def test_a_start_from_engines_imports_no_model_module_and_writes_the_same_image(sdxl_copy, tmp_path, monkeypatch):
    args = ["--model", "tiny-sdxl", "--engines", str(sdxl_copy), "--stages", STAGES, "--prompt", "a red fox",
            "--seed", "7", "--device", "cpu", "--no-progress"]
    # The start before: the engines' components built on the meta device by load_model(skip=...). It runs first:
    # it also computes the plan's memory estimate into the folder (memory-estimates.json), which builds the
    # networks on the meta device; a later start reads it back.
    with monkeypatch.context() as m:
        m.setattr("megafusion.core.engine_bundle.engines_bundle", lambda *a, **k: None)
        assert main([*args, "--output", str(tmp_path / "meta.png")]) == 0

    p = subprocess.run([sys.executable, "-c", DRIVER, *args, "--output", str(tmp_path / "light.png")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    assert "megafusion.core.engine_bundle" in report["modules"]  # the light start did run
    found = [m for m in report["modules"] if m.startswith(NOT_IMPORTED)]
    assert not found, f"a start from engines imported {found[:8]}"
    assert "weights in torch: none" in p.stdout
    assert (tmp_path / "light.png").read_bytes() == (tmp_path / "meta.png").read_bytes()
