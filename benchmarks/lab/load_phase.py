"""The load phase of a run from engines, before and after issue #15's change, on the CPU, one model:

- `before`: what `mf-generate --engines` did: the whole model with its weights (random weights drawn on the CPU,
  or a folder read), then every weight tensor hashed for the engine check (`weights_fingerprint`, scheme 1);
- `after`: the components engines run built without weights (`load_model(skip=...)`), fingerprints from their
  origin (`network_fingerprint`: the random recipe, or the folder's files by remembered hashes).

    python benchmarks/lab/load_phase.py --model sd15 --random-weights --output OUT [--skip unet,vae,...]

Each case runs in a fresh process (`python -c`), so one does not warm the other; its seconds are wall time in the
child around each step (the libraries' imports apart). Writes load_phase.json and load_phase.md into OUT.

With --estimate WxH it also times, in a fresh child, the peak-memory estimate mf-generate makes before any load
(runtime/memory_plan.plan_memory, the networks run on the meta device): part of a cold start's `start` phase.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from megafusion.benchmarks.timing import provenance

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from megafusion.core.loading import COMPONENTS, load_model
from megafusion.engine.cache import weights_fingerprint
from megafusion.engine.file_hashes import FileHashes
from megafusion.engine.fingerprint import network_fingerprint
from diffusers import AutoencoderKL, UNet2DConditionModel  # imported here: diffusers loads them lazily
from transformers import CLIPTextModel, CLIPTextModelWithProjection
case, model, path, random, skip, hashes = json.loads(sys.argv[1])
t1 = time.perf_counter()
bundle = load_model(model, path, random, skip=frozenset(skip) if case == "after" else frozenset())
t2 = time.perf_counter()
names = ["unet", "vae_decoder", *["text_encoder", "text_encoder_2"][:len(bundle.text_encoders)]]
if case == "before":
    prints = [weights_fingerprint(bundle.module_for(n)) for n in names]
else:
    h = FileHashes(hashes)
    prints = [network_fingerprint(bundle, n, h) for n in names]
    h.save()
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "fingerprint_s": t3 - t2,
                  "params": sum(p.numel() for m in (bundle.unet, bundle.vae, *bundle.text_encoders)
                                for p in m.parameters())}))

"""

ESTIMATE = r"""
import json, sys, time
import torch
from megafusion.cli.common import plan_from_args
from megafusion.core.families import get_family
from megafusion.runtime.memory_plan import plan_memory
model, size = json.loads(sys.argv[1])
fam = get_family(model)
plan = plan_from_args(fam, size, None, None)
t0 = time.perf_counter()
plan_memory(fam, plan, torch.float16, torch.bfloat16, 140 * 2**30, True, "pixel", "auto", None, graph_pool=True)
print(json.dumps({"estimate_s": time.perf_counter() - t0}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15")
    p.add_argument("--model-path")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--skip", default="unet,vae,text_encoder,text_encoder_2",
                   help="components the engines run (default: all, as aoti and onnxruntime folders serve them)")
    p.add_argument("--estimate", metavar="WxH", help="also time the memory estimate for this output size")
    p.add_argument("--output", required=True)
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    skip = [s for s in args.skip.split(",") if s]
    rows = []
    for case in ("before", "after", "after"):  # the second `after`: file hashes remembered by the first
        spec = json.dumps([case, args.model, args.model_path, args.random_weights, skip,
                           str(out / "file-hashes.json")])
        res = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        row = {"case": case, **json.loads(res.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{case:<7} load {row['load_s']:7.2f} s  fingerprint {row['fingerprint_s']:7.2f} s  "
              f"(imports {row['imports_s']:.2f} s, {row['params'] / 1e9:.2f} G parameters)", flush=True)
    if args.estimate:
        res = subprocess.run([sys.executable, "-c", ESTIMATE, json.dumps([args.model, args.estimate])],
                             capture_output=True, text=True)
        if res.returncode == 0:
            rows.append({"case": f"memory estimate {args.estimate}", **json.loads(res.stdout.strip().splitlines()[-1])})
            print(f"memory estimate at {args.estimate}: {rows[-1]['estimate_s']:.2f} s", flush=True)
        else:
            print(res.stderr[-2000:], file=sys.stderr)
    (out / "load_phase.json").write_text(json.dumps({"provenance": provenance(), "args": vars(args), "rows": rows},
                                                    indent=1))
    md = ["| case | load s | fingerprint s | imports s |", "|---|---:|---:|---:|"]
    md += [f"| {r['case']} | {r['load_s']:.2f} | {r['fingerprint_s']:.2f} | {r['imports_s']:.2f} |" for r in rows
           if "load_s" in r]
    md += [f"| {r['case']} | {r['estimate_s']:.2f} | | |" for r in rows if "estimate_s" in r]
    (out / "load_phase.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
