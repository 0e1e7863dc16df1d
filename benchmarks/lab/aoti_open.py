"""The open phase of AOTInductor UNet packages, weights inside against `--weights-apart`, on one machine.

Builds a standard and a dilated UNet package of one model twice (`mf-build-engines --networks unet`, with and
without --weights-apart), then opens both packages of each folder in fresh processes (`open_entry`, as
`open_engines` opens them after its checks) and reports, per run: seconds to open each package, then to call
each once (on the CPU a weight file is mapped, its pages read when first used: open plus first call is the fair
sum), the weight files read (`engine/aoti_shared.reads`), and the process's peak RSS growth after the opens and
after the calls (on the CPU the packages' constants live in RAM; on a GPU the copies land in device memory).

The model: tiny-sdxl's family with a wider UNet (`--width C`: block_out_channels C, 2C, 4C; 256 gives 1.4 GB of
fp32 weights), registered in this process and in each child (a lab script; the package does not know it).

    python benchmarks/lab/aoti_open.py --width 256 --runs 3 --output OUT [--device cuda --precision fp16]

Writes aoti_open.json and aoti_open.md into OUT (engines under OUT/engines-{inside,apart}, reused if present).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REGISTER = r"""
import dataclasses
from megafusion.core import families
def register(width):
    base = families.get_family("tiny-sdxl")
    unet = dict(base.unet, block_out_channels=[width, 2 * width, 4 * width], attention_head_dim=[4, 8, 16],
                norm_num_groups=32)
    fam = dataclasses.replace(base, name="lab-sdxl", unet=unet)
    families.FAMILIES[fam.name] = fam
    return fam
"""

CHILD = REGISTER + r"""
import json, resource, sys, time
import torch
from pathlib import Path
from megafusion.engine import aoti_shared
from megafusion.engine.aoti_backend import BACKEND
from megafusion.engine.backend import OpenContext
from megafusion.engine.cache import EngineCache
from megafusion.engine.load import open_entry
width, folder, device = json.loads(sys.argv[1])
fam = register(width)
device = torch.device(device)
if device.type == "cuda":
    torch.cuda.init()
entries = sorted((e for e in EngineCache(folder).entries().values() if e.key.network == "unet"),
                 key=lambda e: e.key.variant != "standard")
ctx = OpenContext(fam, device)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds, runners = {}, []
for e in entries:
    t = time.perf_counter()
    runners.append(open_entry(Path(folder), e, BACKEND, ctx))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds[e.key.variant] = time.perf_counter() - t
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
first = {}
for e, r in zip(entries, runners):  # one call each: weights mapped but not yet read are read here
    side = dict((n, hi) for n, _, _, hi in r.profile.shapes)["sample"][2]
    axes = r.spec.axes(2, side, side, fam.vae_scale)
    inputs = dict(zip((t.name for t in r.spec.inputs), (x.to(device) for x in r.spec.sample_inputs(axes))))
    t = time.perf_counter()
    with torch.no_grad():
        r.run(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    first[e.key.variant] = time.perf_counter() - t
rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"seconds": seconds, "first_call": first, "reads": aoti_shared.reads,
       "peak_rss_growth_gib": (rss1 - rss0) / 2**20, "peak_rss_growth_after_calls_gib": (rss2 - rss0) / 2**20,
       "files_gib": sum(f.size for e in entries for f in e.files) / 2**30}
if device.type == "cuda":
    out["device_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
    import subprocess as sp
    out["device_used_mib"] = sp.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                    capture_output=True, text=True).stdout.strip()
print(json.dumps(out))
"""

BUILD = REGISTER + r"""
import json, sys
width, folder, device, precision, apart = json.loads(sys.argv[1])
register(width)
from megafusion.cli.build_engines import main
args = ["--model", "lab-sdxl", "--stages", "128x128:2,256x256:2", "--backend", "aoti", "--networks", "unet",
        "--device", device, "--precision", precision, "--output", folder]
sys.exit(main(args + (["--weights-apart"] if apart else [])))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256, help="block_out_channels of the first block (default 256)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in ("inside", "apart"):
        folder = out / f"engines-{case}"
        if not (folder / "manifest.json").exists():
            arg = json.dumps([a.width, str(folder), a.device, a.precision, case == "apart"])
            subprocess.run([sys.executable, "-c", BUILD, arg], check=True)
        for run in range(1, a.runs + 1):
            res = subprocess.run([sys.executable, "-c", CHILD, json.dumps([a.width, str(folder), a.device])],
                                 capture_output=True, text=True, check=True)
            row = {"case": case, "run": run, **json.loads(res.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            rows.append(row)
    (out / "aoti_open.json").write_text(json.dumps({"width": a.width, "device": a.device,
                                                    "precision": a.precision, "rows": rows}, indent=1))
    lines = [f"# open of a standard + dilated UNet package pair (lab-sdxl width {a.width}, {a.precision}, "
             f"{a.device})", "", "| case | run | files GiB | open standard s | open dilated s | first calls s | "
             "weight files read | peak RSS growth GiB (open / after first calls) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, f = r["seconds"], r["first_call"]
        lines.append(f"| {r['case']} | {r['run']} | {r['files_gib']:.2f} | {s['standard']:.2f} | {s['dilated']:.2f} | "
                     f"{f['standard'] + f['dilated']:.2f} | {r['reads']} | {r['peak_rss_growth_gib']:.2f} / "
                     f"{r['peak_rss_growth_after_calls_gib']:.2f} |")
    (out / "aoti_open.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
