"""Fresh `mf-generate --engines DIR` processes, one after another, each timed from spawn to exit with its phases
(`megafusion.benchmarks.cold_start`: start, model load, fingerprint, verify, open, first image):

    python benchmarks/lab/cold_start_phases.py --engines DIR --runs 3 --device cuda --output OUT -- \
        --model sdxl --random-weights --size 2048x2048 --prompt "a lighthouse"

Without --engines the processes run whatever mf-generate's arguments say (the compiled path's warm start:
`-- --mode compiled --compile-cache DIR ...`); --fresh-inductor-cache gives each its own empty Inductor and
Triton cache folders, so only the compile cache can make it warm.

mf-build-engines remembers the sha256 of the files it built (engine/file_hashes.py), so no run reads an engine
file to verify it unless the folder was built otherwise (the first run then hashes them and remembers). Writes
cold_start.json and cold_start.md into OUT, the images as cold-N.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from megafusion.benchmarks.cold_start import run_cold
from megafusion.benchmarks.timing import provenance


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", help="the mf-build-engines folder (default: none, mf-generate's own arguments)")
    p.add_argument("--fresh-inductor-cache", action="store_true",
                   help="each run gets empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR folders")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", required=True)
    p.add_argument("generate_args", nargs=argparse.REMAINDER, help="-- then mf-generate's arguments")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.generate_args if a != "--"]
    runs = []
    for i in range(1, args.runs + 1):
        child = [*extra, "--device", args.device, "--no-progress", "--output", str(out / f"cold-{i}.png")]
        if args.engines:
            child += ["--engines", args.engines]
        env = None
        if args.fresh_inductor_cache:
            fresh = Path(tempfile.mkdtemp(prefix=f"mf-cold-{i}-"))
            env = {"TORCHINDUCTOR_CACHE_DIR": str(fresh / "inductor"), "TRITON_CACHE_DIR": str(fresh / "triton")}
        c = run_cold(f"run {i}", child, args.device, env=env, timeout=900)
        runs.append(c)
        on_disk = "" if c.image_on_disk_s is None else f", image on disk at {c.image_on_disk_s:.1f} s"
        print(f"run {i}: {c.seconds:.1f} s (exit {c.returncode}{on_disk}): {c.describe_phases()}", flush=True)
        for line in c.cache_lines:  # compiled runs: warm or not, functions loaded against traced
            print(f"run {i}: {line}", flush=True)
        if c.returncode != 0:
            print(c.tail, file=sys.stderr)
            break
    (out / "cold_start.json").write_text(json.dumps(
        {"provenance": provenance(), "args": vars(args), "runs": [dataclasses.asdict(c) for c in runs]}, indent=1))
    names = list(dict.fromkeys(k for c in runs for k in (c.phases or {})))
    md = ["| run | seconds (to exit) | image on disk | " + "".join(f"{n} | " for n in names) + "device peak GiB |",
          "|---|---:|---:|" + "---:|" * len(names) + "---:|"]
    for c in runs:
        ph = c.phases or {}
        on_disk = "–" if c.image_on_disk_s is None else f"{c.image_on_disk_s:.1f}"
        md.append(f"| {c.name} | {c.seconds:.1f} | {on_disk} | "
                  + "".join(f"{ph[n]:.2f} | " if n in ph else "– | " for n in names)
                  + f"{'–' if c.device_peak_gib is None else f'{c.device_peak_gib:.1f}'} |")
    md += [f"\n{c.name}: {line}" for c in runs for line in c.cache_lines]
    (out / "cold_start.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if runs and all(c.returncode == 0 for c in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
