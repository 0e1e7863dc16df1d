"""libmegafusion against mf-generate on SD3 / FLUX engines (issue #17 item 4), on any device: the C API's image
(through ctypes, tests/cpp/flow_capi.py) and Python's from the same folder, token ids and seed; their largest
difference in levels of 255 and each side's wall time (the second of two runs: the first loads the packages); then
the C API again with CUDA graphs off (mf_set_cuda_graphs(ctx, 0)): its image's difference from the graphed one,
its wall time and the graph counters of the two graphed runs (captures: one per stage descriptor; replays: one per
step). Fails where C++ and Python differ by more than 1 level or graphs on and off by more than 2.

    python benchmarks/lab/flow_capi_parity.py --lib build/cpp/libmegafusion.so --model tiny-flux \
        --engines DIR --stages 128x128:2,160x160:2 --device cuda --output OUT
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "cpp"))
from flow_capi import Library, ids_text  # noqa: E402

from megafusion.cli import generate as gen_cli  # noqa: E402
from megafusion.core.loading import load_model  # noqa: E402
from megafusion.runtime.flow_tokens import flow_token_ids as ids  # noqa: E402


def main(argv=None) -> int:
    faulthandler.enable()  # a crash inside the library prints the Python line that called it
    p = argparse.ArgumentParser()
    p.add_argument("--lib", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--engines", required=True)
    p.add_argument("--stages", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", default="a red fox")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--relay", default="pixel")
    p.add_argument("--dtype", default="fp32", help="the folder's precision (mf-generate loads the model in it)")
    p.add_argument("--output", required=True)
    p.add_argument("--ids-out", help="write the token ids for cpp/tests/flow_run.c there and stop")
    a = p.parse_args(argv)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_model(a.model)
    fam = bundle.family
    if a.ids_out:  # the same ids, for the C driver (no Python in its process: sanitizers see only the library)
        Path(a.ids_out).write_text(ids_text(ids(bundle, a.prompt), ids(bundle, "") if fam.cfg else None))
        return 0
    lib = Library(Path(a.lib))
    rc, ctx = lib.open(Path(a.engines), a.model, a.device)
    if rc != 0:
        print(f"mf_context_create: {lib.error()}")
        return 1
    neg = ids(bundle, "") if fam.cfg else None
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        rc, cpp = lib.generate(ctx, a.stages, a.seed, fam.default_guidance, ids(bundle, a.prompt), neg, a.relay)
        times.append(time.perf_counter() - t0)
        if rc != 0:
            print(f"mf_generate_with: {cpp}")
            return 1
    Image.fromarray(cpp).save(out / "cpp.png")
    captures, replays = lib.counters(ctx)
    lib.set_graphs(ctx, False)
    t0 = time.perf_counter()
    rc, plain = lib.generate(ctx, a.stages, a.seed, fam.default_guidance, ids(bundle, a.prompt), neg, a.relay)
    off_s = time.perf_counter() - t0
    if rc != 0:
        print(f"mf_generate_with (graphs off): {plain}")
        return 1
    graphs_diff = int(np.abs(cpp.astype(int) - plain.astype(int)).max())
    py_times = []
    for _ in range(2):
        t0 = time.perf_counter()
        assert gen_cli.main(["--model", a.model, "--engines", a.engines, "--stages", a.stages, "--prompt", a.prompt,
                             "--seed", str(a.seed), "--device", a.device, "--no-progress", "--relay", a.relay,
                             "--dtype", a.dtype,
                             "--output", str(out / "py.png")]) == 0
        py_times.append(time.perf_counter() - t0)
    py = np.asarray(Image.open(out / "py.png").convert("RGB"))
    diff = np.abs(cpp.astype(int) - py.astype(int))
    res = {"model": a.model, "device": a.device, "dtype": a.dtype, "stages": a.stages, "relay": a.relay, "max_diff": int(diff.max()),
           "mean_diff": float(diff.mean()), "image_std": float(py.std()), "cpp_s": times, "python_cli_s": py_times,
           "graphs": {"captures": captures, "replays": replays, "max_diff_off": graphs_diff, "cpp_off_s": off_s}}
    (out / f"flow_capi_{a.model}_{a.dtype}_{a.relay}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    # On CUDA the Python pixel relay runs the fused relay kernel, the C API ATen's bicubic: 2 levels there, as the
    # C API GPU tests allow (tests/cpp GRAPH_TOL); on the CPU both run ATen's.
    tol = 2 if a.device == "cuda" else 1
    return 0 if diff.max() <= tol and graphs_diff <= 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
