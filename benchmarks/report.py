"""results.json and report.md from a BenchResult."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .bench import BenchResult, VariantResult


def _f(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _n(x: float | None) -> str:
    """Numbers from 1e-6 (tiny models) to 1e6 (G-MACs of a plan), all readable."""
    if x is None:
        return "–"
    if x == 0 or abs(x) >= 100:
        return f"{x:,.1f}"
    return f"{x:.3f}" if abs(x) >= 0.01 else f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1000 * x:,.1f}"


def to_json(result: BenchResult) -> dict:
    d = dataclasses.asdict(result)
    for row, obj in zip(d["paper"], result.paper):
        row["relative_diff"] = obj.relative_diff  # a property, which asdict leaves out
    return d


def _mem(pair: tuple[float, float] | None) -> str:
    return "–" if pair is None else f"{pair[0]:.1f} / {pair[1]:.1f}"


def summary_table(result: BenchResult) -> list[str]:
    lines = ["| variant | plan | median total (ms) | first (ms) | peak GiB first (alloc / reserved) "
             "| peak GiB steady | paper G-MACs | true TFLOP | achieved TFLOP/s | of peak |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in result.variants:
        lines.append(f"| {v.name} | {v.plan} | {_ms(v.median_s)} | {_ms(v.first_s)} | {_mem(v.first_peak_gib)} "
                     f"| {_mem(v.steady_peak_gib)} | {_n(v.paper_gmacs)} | {_n(v.true_tflop)} "
                     f"| {_n(v.tflop_per_s)} | {_pct(v.fraction_of_peak)} |")
    return lines


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}x"


def conditioned_table(result: BenchResult) -> list[str]:
    """Each conditioned row against its plain row (time, cost, peak memory, set-up); none without conditions."""
    rows = [(v, next((p for p in result.variants if p.name == v.pair), None))
            for v in result.variants if v.role == "conditioned"]
    if not rows:
        return []
    lines = ["## Conditioned against plain", "",
             "| conditioned row | plain row | median ms (plain) | time | true TFLOP (plain) | TFLOP "
             "| peak GiB steady (plain) | set-up s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for v, p in rows:
        if p is None:
            continue
        peak = (f"{_mem(v.steady_peak_gib)} ({_mem(p.steady_peak_gib)})" if v.steady_peak_gib or p.steady_peak_gib
                else "–")
        setup = "–" if v.setup_s is None else f"{v.setup_s:.2f} ({v.setup})"
        lines.append(f"| {v.name} | {p.name} | {_ms(v.median_s)} ({_ms(p.median_s)}) | {_ratio(v.median_s, p.median_s)} "
                     f"| {_n(v.true_tflop)} ({_n(p.true_tflop)}) | {_ratio(v.true_tflop, p.true_tflop)} "
                     f"| {peak} | {setup} |")
    return lines + [""]


def _segments_table(v: VariantResult) -> list[str]:
    lines = [f"### {v.name}: {v.plan}", "",
             "| segment | median ms | paper G-MACs | true TFLOP | attention TFLOP | TFLOP/s | of peak |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in v.segments:
        lines.append(f"| {s.name} | {_ms(s.median_s)} | {_n(s.paper_gmacs)} | {_n(s.true_tflop)} "
                     f"| {_n(s.attention_tflop)} | {_n(s.tflop_per_s)} | {_pct(s.fraction_of_peak)} |")
    lines.append(f"| **total** (text encoders excluded from TFLOP) | {_ms(v.median_s)} | {_n(v.paper_gmacs)} "
                 f"| {_n(v.true_tflop)} | | {_n(v.tflop_per_s)} | {_pct(v.fraction_of_peak)} |")
    return lines + [""]


def markdown(result: BenchResult) -> str:
    env, st = result.environment, result.settings
    peak = "not measured" if result.peak_tflop_per_s is None else \
        f"{result.peak_tflop_per_s:,.0f} TFLOP/s ({result.peak_source})"
    out = [
        f"# mf-bench: {result.model}, {st.get('output', '')}", "",
        "| | |", "|---|---|",
        f"| date (UTC) | {env.date_utc} |",
        f"| code | commit {env.commit or 'unknown'}{' (working tree modified)' if env.dirty else ''} |",
        f"| command | `{env.command}` |",
        f"| device | {env.device_name} ({env.device}), driver {env.driver or '–'}, CUDA {env.cuda or '–'} |",
        f"| libraries | torch {env.torch}, diffusers {env.diffusers}, transformers {env.transformers}, "
        f"Python {env.python} |",
        f"| precision | {st.get('denoiser', 'UNet')} {st.get('dtype')}, VAE {st.get('vae_dtype')} |"
        if not st.get("cost_only") else "| precision | – (costs only) |",
        f"| timing | {st.get('repeats')} timed runs after {st.get('warmup')} warm-up, median |"
        if not st.get("cost_only") else "| timing | not timed (--cost-only) |",
        f"| guidance, seed | {st.get('guidance')}, {st.get('seed')} "
        f"({'CFG batch 2' if st.get('cfg_batch', 2) == 2 else 'one pass per step'}) |",
        f"| peak | {peak} |", "",
        "## Summary", "", *summary_table(result), "",
    ]
    out += conditioned_table(result)
    if result.speedups:
        out += ["## Speedups", "", "| engine | over | speedup |", "|---|---|---:|"]
        out += [f"| {s.engine} | {s.over} | {s.factor:.2f}x |" for s in result.speedups] + [""]
    if result.cold_starts:
        out += ["## Cold start: a fresh process to its first image", "",
                "| run | seconds (to exit) | image on disk s | exit | device peak GiB (sampled) |",
                "|---|---:|---:|---:|---:|"]
        out += [f"| {c.name} | {c.seconds:.1f} | {_f(c.image_on_disk_s, '.1f')} | {c.returncode} | "
                f"{_f(c.device_peak_gib, '.1f')} |" for c in result.cold_starts]
        out += ["", "Each a separate `mf-generate` process (model and engine load, compiles or captures, one "
                "generation, the PNG written); commands in results.json."]
        out += [f"- {c.name}, phases: {c.describe_phases()}" for c in result.cold_starts if c.phases]
        out += [""]
    out += ["## Per-segment breakdown", ""]
    for v in result.variants:
        out += _segments_table(v)
    if result.paper:
        out += ["## The paper's Table 1 cost rows", "",
                "| plan | counted as | paper G-MACs | ours G-MACs | ours vs paper | true TFLOP |",
                "|---|---|---:|---:|---:|---:|"]
        for p in result.paper:
            diff = "–" if p.relative_diff is None else f"{100 * p.relative_diff:+.3f}%"
            out.append(f"| {p.label} | {p.convention} | {_f(p.paper_gmacs, ',.1f')} | {p.ours_gmacs:,.1f} "
                       f"| {diff} | {_n(p.true_tflop)} |")
        out.append("")
    out += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(out)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # no half-written report under the real name
    finally:
        tmp.unlink(missing_ok=True)


def write_reports(result: BenchResult, out_dir: Path) -> list[Path]:
    """results.json, report.md and chart.png in `out_dir` (created if missing)."""
    from .chart import draw_chart

    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "results.json", out_dir / "report.md"
    _atomic_write(js, json.dumps(to_json(result), indent=2).encode())
    _atomic_write(md, markdown(result).encode())
    png = out_dir / "chart.png"
    draw_chart(result, png)
    return [js, md, png]
