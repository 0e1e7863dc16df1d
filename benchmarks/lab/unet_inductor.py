"""Which Inductor option set (engine.torch_fast.INDUCTOR_SETS) makes the compiled UNet fastest, at real size
(random weights, fp16, CFG batch 2). Per shape and set: compile time, the median replay of one CUDA graph
around the compiled call, the compiled forward's kernel time and kernel count (torch.profiler, not graphed),
their gap, TFLOP/s and the largest output difference to the `default` set; then each set's time weighted by
the plan's steps, and the best set.

python benchmarks/lab/unet_inductor.py --model sdxl --sets default,freezing,gemm,gemm+freezing \
    --shapes 1024:1,2048:2 --steps 40,10 --output DIR

Writes DIR/unet_inductor.json (after every row), DIR/unet_inductor.md and DIR/best_set.txt (the name only).
The UNet is prepared as FastTorchNetworks prepares it and called as `TorchNetworks.unet` calls it: the
compiled module inside `mid_dilation`, in inference mode, so the dilated variant is the one compiled.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from megafusion.engine.torch_fast import INDUCTOR_SETS, FastOptions, compile_with, inductor_set, prepare_module
from megafusion.core.dilation import mid_dilation
from megafusion.core.loading import ModelBundle, load_model

from megafusion.benchmarks.flops import MetaCostCounter
from megafusion.benchmarks.timing import provenance
from kernel_breakdown import breakdown
from sdpa_backends import time_ms

Row = dict[str, object]
Shape = tuple[int, int]
COLUMNS = ("set", "side", "dilation", "compile_s", "graph_ms", "kernel_sum_ms", "kernels_per_forward", "gap_ms",
           "tflops", "max_abs_diff_vs_default")


def parse_sets(text: str) -> list[str]:
    """Names from INDUCTOR_SETS, `default` first (the other sets' outputs are compared with its output)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for n in names:
        inductor_set(n)
    if not names:
        raise ValueError("no Inductor set given")
    return sorted(names, key=lambda n: n != "default")


def parse_shapes(text: str) -> list[Shape]:
    """`SIDE:DILATION,...` (dilation 1 where left out) -> [(side, dilation), ...]."""
    shapes = []
    for item in text.split(","):
        side, _, dil = item.strip().partition(":")
        try:
            shapes.append((int(side), int(dil or 1)))
        except ValueError:
            raise ValueError(f"bad shape {item!r}: expected SIDE:DILATION, e.g. 1024:1") from None
    return shapes


def parse_steps(text: str, n_shapes: int) -> list[int]:
    steps = [int(s) for s in text.split(",")]
    if len(steps) != n_shapes:
        raise ValueError(f"--steps has {len(steps)} values for {n_shapes} shapes")
    return steps


def plan_summary(rows: Sequence[Row], shapes: Sequence[Shape], steps: Sequence[int]) -> dict[str, float | None]:
    """Per set: sum over shapes of steps * graph_ms; None for a set that failed at or has not reached a shape."""
    out: dict[str, float | None] = {}
    for name in dict.fromkeys(str(r["set"]) for r in rows):
        ms = {(r["side"], r["dilation"]): r.get("graph_ms") for r in rows if r["set"] == name}
        got = [ms.get(tuple(s)) for s in shapes]
        out[name] = None if None in got else sum(n * m for n, m in zip(steps, got))
    return out


def best_set(summary: dict[str, float | None]) -> str | None:
    done = {k: v for k, v in summary.items() if v is not None}
    return min(done, key=done.__getitem__) if done else None


def unet_inputs(bundle: ModelBundle, side: int, device: torch.device, dtype: torch.dtype) -> tuple:
    """Seeded (sample, timestep, hidden states, added conds) of one CFG step, as `TorchNetworks._unet` passes them."""
    fam, cfg = bundle.family, bundle.family.unet
    g = torch.Generator(device).manual_seed(0)
    lat = side // fam.vae_scale

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    sample = rand(2, cfg["in_channels"], lat, lat)  # contiguous, as the graphed step's torch.cat gives it
    ehs = rand(2, 77, cfg["cross_attention_dim"])
    added = None
    if fam.is_xl:
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": rand(2, pooled),
                 "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, device=device, dtype=dtype)}
    return sample, torch.tensor(501, device=device), ehs, added


def unet_call(unet: torch.nn.Module, fn: Callable, inputs: tuple, delta: int) -> Callable[[], torch.Tensor]:
    sample, t, ehs, added = inputs

    def call() -> torch.Tensor:
        with torch.inference_mode(), mid_dilation(unet, delta):
            return fn(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added, return_dict=False)[0]
    return call


def measure(call: Callable[[], torch.Tensor]) -> tuple[Row, torch.Tensor]:
    t0 = time.perf_counter()
    out = call().float()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # as runtime/graphs.py: warm up off the capture stream
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph_ms = time_ms(graph.replay, reps=20)
    del graph
    bd = breakdown(call, reps=2)
    return {"compile_s": round(compile_s, 1), "graph_ms": graph_ms, "kernel_sum_ms": bd["total_ms"],
            "kernels_per_forward": bd["kernels_per_call"], "gap_ms": graph_ms - bd["total_ms"],
            "by_category_ms": bd["by_category_ms"]}, out


def _cell(v: object) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")


def markdown(report: dict) -> str:
    lines = [f"# Inductor option sets, {report['model']} UNet: {report['gpu']}, torch {report['torch']}", "",
             "| " + " | ".join(COLUMNS) + " | error |", "|" + "---|" * (len(COLUMNS) + 1)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in (*COLUMNS, "error")) + " |" for r in report["rows"]]
    lines += ["", f"Plan-weighted ms (steps {report['steps']} at shapes {report['shapes']}):", ""]
    lines += [f"- {n}: {_cell(v)}" for n, v in report["summary_ms"].items()]
    return "\n".join(lines + ["", f"Best set: {report['best']}", ""])


def save(out: Path, report: dict) -> None:
    report["summary_ms"] = plan_summary(report["rows"], report["shapes"], report["steps"])
    report["best"] = best_set(report["summary_ms"])
    (out / "unet_inductor.json").write_text(json.dumps(provenance() | report, indent=2))
    (out / "unet_inductor.md").write_text(markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 benchmarks/lab/unet_inductor.py")
    p.add_argument("--model", default="sdxl")
    p.add_argument("--sets", default="default,freezing,gemm,gemm+freezing")
    p.add_argument("--shapes", default="1024:1,2048:2", help="SIDE:DILATION,... (pixel side, mid-block dilation)")
    p.add_argument("--steps", default="40,10", help="steps per shape, for the plan-weighted time")
    p.add_argument("--output", default="unet-inductor-results")
    args = p.parse_args(argv)
    try:
        sets, shapes = parse_sets(args.sets), parse_shapes(args.shapes)
        steps = parse_steps(args.steps, len(shapes))
    except ValueError as e:
        p.error(str(e))
    dev = torch.device("cuda")
    bundle = load_model(args.model, random_weights=True, device=dev, dtype=torch.float16)
    unet, o = bundle.unet, FastOptions()
    prepare_module(unet, o.unet_attention, o)  # once, as FastTorchNetworks does with its default options
    torch.backends.cudnn.benchmark = o.cudnn_benchmark
    counter = MetaCostCounter(bundle.family)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "model": args.model,
                    "sets": {n: INDUCTOR_SETS[n] for n in sets}, "shapes": shapes, "steps": steps, "rows": []}
    for side, delta in shapes:
        inputs = unet_inputs(bundle, side, dev, torch.float16)
        tflop = counter.unet(side, side, 2, delta).flops / 1e12
        ref = None
        for name in sets:
            row: Row = {"set": name, "side": side, "dilation": delta}
            torch._dynamo.reset()  # nothing compiled for another set is reused
            torch.cuda.empty_cache()
            try:
                compiled = compile_with(unet, FastOptions(inductor_options=INDUCTOR_SETS[name]))
                r, y = measure(unet_call(unet, compiled, inputs, delta))
                row.update(r, tflops=tflop / r["graph_ms"] * 1e3)
                ref = y if name == "default" else ref
                row["max_abs_diff_vs_default"] = None if ref is None else (y - ref).abs().max().item()
            except Exception as e:  # one failing set must not cost the others' results
                row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            save(out, report)
    for name, ms in report["summary_ms"].items():
        print(f"[{name}] plan-weighted {_cell(ms)} ms", flush=True)
    print(f"best set: {report['best']}", flush=True)
    if report["best"] is None:
        return 1
    (out / "best_set.txt").write_text(report["best"] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
