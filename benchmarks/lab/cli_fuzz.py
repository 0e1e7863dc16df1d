"""Bad values into the CLIs, one option at a time: each case must end with status 0 (a value that is valid after all)
or 2 with one line naming the problem; a traceback, another status or a hang past --timeout is a finding.

python3 benchmarks/lab/cli_fuzz.py --tools generate,build,bench --output DIR

Each case runs in a fresh process (tiny-sd15, CPU) in a scratch folder of its own under DIR, removed after; mf-generate
cases add --dry-run, so a value that passes stops before the model load. About 10 minutes per tool on two cores.
Writes DIR/cli_fuzz.json (the findings, the commit and the command) and prints one line per finding. mf-serve is left
out: a valid value starts Ray and serves until stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from megafusion.benchmarks.timing import provenance

BASE = {
    "generate": ["megafusion.cli.generate", "--model", "tiny-sd15", "--prompt", "a cat", "--size", "128x128",
                 "--steps", "2"],
    "build": ["megafusion.cli.build_engines", "--model", "tiny-sd15", "--backend", "onnxruntime"],
    "bench": ["megafusion.cli.bench", "--model", "tiny-sd15", "--size", "128x128", "--repeats", "1"],
}
OUTPUT = {"generate": ("--output", "o.png"), "build": ("--output", "eng"), "bench": ("--output", "b")}
OPTIONS = {
    "generate": ["--size", "--stages", "--steps", "--guidance", "--seed", "--dilation", "--device", "--output",
                 "--engines", "--compile-cache", "--image", "--strength", "--start-stage", "--controlnet",
                 "--control-image", "--control-scale", "--control-start", "--control-end", "--ip-adapter",
                 "--ip-adapter-image", "--ip-adapter-scale", "--lora", "--max-memory", "--vae-tile-size",
                 "--weights-seed", "--model", "--model-path", "--inductor", "--prompt", "--negative-prompt"],
    "build": ["--size", "--stages", "--output", "--device", "--precision", "--networks", "--jobs", "--model-path",
              "--sizes", "--opt-size", "--model"],
    "bench": ["--size", "--stages", "--repeats", "--warmup", "--variants", "--engine-dir", "--direct-for",
              "--compile-cache", "--cold-start", "--image", "--strength", "--start-stage", "--controlnet",
              "--control-image", "--control-scale", "--output", "--device"],
}
VALUES = ["", "-1", "nan", "1e9", "abc", "128x-128", "/dev/null", "/nonexistent/dir", "a:b:c", "512:2,256:2"]


def finding(returncode, stderr: str) -> bool:
    """A traceback, a status other than 0 or 2, or a refusal of more than one line (argparse's usage lines aside)."""
    if "Traceback" in stderr or returncode not in (0, 2):
        return True
    lines = [l for l in stderr.strip().splitlines() if l.strip() and not l.startswith(("usage", "  "))]
    return returncode == 2 and len(lines) > 1


def run_case(tool: str, option: str, value: str, scratch: Path, timeout: float) -> dict | None:
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        cmd = [sys.executable, "-m", *BASE[tool], option, value]
        if option != OUTPUT[tool][0]:
            cmd += [OUTPUT[tool][0], str(Path(d) / OUTPUT[tool][1])]
        if tool == "generate":
            cmd.append("--dry-run")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=d)
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            rc, err = "timeout", ""
    if not finding(rc, err):
        return None
    return {"tool": tool, "option": option, "value": value, "status": rc, "stderr": err[-800:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", default="generate,build,bench", help="comma-separated: " + ", ".join(BASE))
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per case")
    ap.add_argument("--output", type=Path, required=True, help="folder for cli_fuzz.json and the scratch folders")
    args = ap.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in BASE]
    if unknown or not tools:
        ap.error(f"--tools {args.tools!r}: choose from {', '.join(BASE)}")
    args.output.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cli-fuzz-", dir=args.output))
    findings, cases = [], 0
    for tool in tools:
        for option in OPTIONS[tool]:
            for value in VALUES:
                cases += 1
                f = run_case(tool, option, value, scratch, args.timeout)
                if f:
                    findings.append(f)
                    print(json.dumps(f), flush=True)
    scratch.rmdir()
    out = args.output / "cli_fuzz.json"
    out.write_text(json.dumps({"provenance": provenance(), "cases": cases, "findings": findings}, indent=1))
    print(f"{cases} cases, {len(findings)} findings; wrote {out}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
