"""mf-bench on the tiny models (CPU): the reports' structure and accounting, never the speed."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from megafusion.benchmarks.baseline_eager import megafusion_eager
from megafusion.benchmarks.bench import BenchResult, cost_variants, notes, run_variants, speedups
from megafusion.cli.bench import main
from megafusion.benchmarks.flops import PAPER_TABLE1_GMACS, SDXL_NOTE
from megafusion.benchmarks.paper import table1_rows
from megafusion.benchmarks.report import markdown, to_json, write_reports
from megafusion.benchmarks.timing import Measurement, environment, measure
from megafusion.core.families import SDXL
from megafusion.core.plan import default_plan
from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

KINDS_MF = ["text", "stage", "relay", "stage", "relay", "stage", "decode"]


@pytest.fixture(scope="module")
def cpu_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--model", "tiny-sd15", "--device", "cpu", "--repeats", "2", "--warmup", "0", "--steps", "4",
               "--output", str(out)])
    return rc, out


def test_cpu_bench_writes_valid_reports(cpu_bench):
    rc, out = cpu_bench
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {"model", "settings", "environment", "peak_tflop_per_s", "variants", "speedups", "notes"}
    assert data["model"] == "tiny-sd15" and data["peak_tflop_per_s"] is None  # no GPU, no peak
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["diffusers"] and env["date_utc"] and env["device"] == "cpu"
    assert [(v["name"], v["role"]) for v in data["variants"]] == [
        ("direct", "direct"), ("diffusers eager", "baseline"), ("engine: torch", "engine")]
    direct, eager, engine = data["variants"]
    assert [s["kind"] for s in direct["segments"]] == ["text", "stage", "decode"]
    assert "x4 " in direct["plan"]  # the same 4 steps, one stage
    for v in (eager, engine):
        assert [s["kind"] for s in v["segments"]] == KINDS_MF
    for v in data["variants"]:
        assert len(v["totals_s"]) == 2 and v["median_s"] > 0
        assert all(s["median_s"] is not None and s["median_s"] >= 0 for s in v["segments"])
        assert v["paper_gmacs"] == pytest.approx(sum(s["paper_gmacs"] for s in v["segments"]))
        assert v["true_tflop"] == pytest.approx(sum(s["true_tflop"] for s in v["segments"] if s["kind"] != "text"))
        assert v["tflop_per_s"] == pytest.approx(v["true_tflop"] / v["median_s"])
        assert v["fraction_of_peak"] is None
    # both MegaFusion rows run the same plan, so the same cost; direct costs more (all steps at full size)
    assert eager["paper_gmacs"] == engine["paper_gmacs"] < direct["paper_gmacs"]
    assert eager["true_tflop"] == engine["true_tflop"]
    sp = {(s["engine"], s["over"]): s["factor"] for s in data["speedups"]}
    assert set(sp) == {("engine: torch", "direct"), ("engine: torch", "diffusers eager")}
    assert sp[("engine: torch", "direct")] == pytest.approx(direct["median_s"] / engine["median_s"])


def test_cpu_bench_markdown_and_chart(cpu_bench):
    _, out = cpu_bench
    md = (out / "report.md").read_text()
    for needle in ("# mf-bench: tiny-sd15", "## Summary", "## Speedups", "## Per-segment breakdown",
                   "### engine: torch", "relay 2->3", "| direct |", "diffusers 0.", "paper G-MACs", "true TFLOP"):
        assert needle in md, needle
    assert SDXL_NOTE not in md and "## The paper's Table 1" not in md  # tiny models: no paper rows
    with Image.open(out / "chart.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


def test_eager_baseline_computes_what_the_engine_computes(tiny_sd15):
    # the speedup over the baseline is only fair if both produce the same image
    plan = default_plan(tiny_sd15.family, total_steps=5)
    ours = MegaFusionPipeline(tiny_sd15).generate(plan, GenerationOptions("a fox", seed=4))
    eager = megafusion_eager(tiny_sd15, plan, "a fox", seed=4)
    rel = float((eager.latent - ours.latent).norm() / ours.latent.norm())
    assert rel < 1e-4
    assert eager.image.shape == ours.image.shape
    assert [n for n, _ in eager.timings] == [n for n, _ in ours.timings]
    other = megafusion_eager(tiny_sd15, plan, "a fox", seed=4, reschedule=False)
    assert float((other.latent - ours.latent).norm() / ours.latent.norm()) > 1e-3


def test_sdxl_report_states_the_paper_convention(sd15_counter, sdxl_counter, tmp_path):
    plan = default_plan(SDXL)
    rows = run_variants(cost_variants(SDXL, plan), SDXL, torch.device("cpu"), 1, 0, None, sdxl_counter,
                        time_them=False)
    result = BenchResult("sdxl", {"output": "2048x2048", "cost_only": True}, environment(torch.device("cpu")),
                         None, None, rows, [], table1_rows(sd15_counter, sdxl_counter), notes(SDXL))
    md = markdown(result)
    assert SDXL_NOTE in md and "540,200.0" in md and "216,100.0" in md
    data = to_json(result)
    scaled = [r for r in data["paper"] if r["paper_gmacs"] == PAPER_TABLE1_GMACS["sdxl 2048 megafusion"]]
    assert len(scaled) == 1 and abs(scaled[0]["relative_diff"]) < 0.005
    true_mf = next(r for r in data["paper"] if "true SDXL" in r["convention"] and "MegaFusion" in r["label"])
    assert true_mf["true_tflop"] == pytest.approx(rows[1].true_tflop)  # the same plan, counted once
    assert all(s.median_s is None for v in rows for s in v.segments)
    paths = write_reports(result, tmp_path)  # untimed: the chart shows TFLOP instead of seconds
    assert all(p.stat().st_size > 0 for p in paths)


def test_measure_and_speedups():
    calls = []

    def fn():
        calls.append(1)
        return [("a", 0.1 * len(calls)), ("b", 1.0)]

    m = measure(fn, torch.device("cpu"), repeats=3, warmup=2)
    assert len(calls) == 5 and len(m.totals_s) == 3
    assert m.segment_medians() == [("a", pytest.approx(0.4)), ("b", 1.0)]
    assert Measurement([3.0, 1.0, 2.0]).median_s == 2.0
    with pytest.raises(ValueError):
        measure(fn, torch.device("cpu"), repeats=0, warmup=0)


def test_speedups_pair_every_engine_with_each_reference(cpu_bench):
    _, out = cpu_bench
    data = json.loads((out / "results.json").read_text())
    from megafusion.benchmarks.bench import VariantResult

    vs = [VariantResult(**{**v, "segments": []}) for v in data["variants"]]
    vs.append(VariantResult(**{**data["variants"][2], "name": "engine: other", "segments": []}))
    assert len(speedups(vs)) == 4  # two engines, each over direct and over the baseline


def test_measure_records_the_first_call_apart():
    calls = []

    def fn():
        calls.append(1)
        return [("a", 0.0)]

    m = measure(fn, torch.device("cpu"), repeats=2, warmup=1)
    assert m.first_s is not None and m.first_s >= 0 and len(m.totals_s) == 2
    assert m.first_peak is None and m.steady_peak is None  # device memory is counted on CUDA only


def _row(name, role, median, pair=""):
    from megafusion.benchmarks.bench import VariantResult

    return VariantResult(name, role, "", "", [median], median, 0.0, 0.0, 0.0, None, None, [], pair)


def test_each_engine_is_compared_with_the_direct_row_on_its_own_networks():
    rows = [_row("direct", "direct", 10.0, "engine: torch"), _row("diffusers eager", "baseline", 6.0),
            _row("engine: torch", "engine", 5.0), _row("direct (engines:aoti)", "direct", 4.0, "engine: engines:aoti"),
            _row("engine: engines:aoti", "engine", 2.0), _row("engine: compiled", "engine", 1.0)]
    got = {(s.engine, s.over): s.factor for s in speedups(rows)}
    assert got == {("engine: torch", "diffusers eager"): 6.0 / 5.0, ("engine: torch", "direct"): 2.0,
                   ("engine: engines:aoti", "diffusers eager"): 3.0,
                   ("engine: engines:aoti", "direct (engines:aoti)"): 2.0,  # not the torch engine's direct row
                   ("engine: compiled", "diffusers eager"): 6.0, ("engine: compiled", "direct"): 10.0}


def test_cold_start_runs_a_fresh_process(tmp_path):
    from megafusion.benchmarks.cold_start import run_cold

    c = run_cold("dry run", ["--model", "tiny-sd15", "--prompt", "x", "--dry-run", "--output",
                             str(tmp_path / "x.png")], torch.device("cpu"))
    assert c.returncode == 0 and c.seconds > 0 and "estimated peak" in c.tail and c.device_peak_gib is None
    assert "megafusion.cli.generate" in c.command and "--dry-run" in c.command


@pytest.mark.parametrize("argv", [
    ["--variants", "torch", "--direct-for", "graphs"],
    ["--cold-start", "warp"],
    ["--variants", "engines:aoti"],
    ["--variants", "engines:aoti", "--engine-dir", "/no/such/folder"],
    ["--steps", "0"],
    ["--steps", "4", "--stages", "128x128:2,256x256:2"],
    ["--model", "no-such-model"],
    ["--stages", "100x100:4"],
    ["--repeats", "0"],
])
def test_cli_rejects_bad_input(argv, tmp_path, capsys):
    assert main(["--model", "tiny-sd15", "--device", "cpu", "--output", str(tmp_path), *argv]) == 2
    assert "mf-bench: error:" in capsys.readouterr().err


@pytest.mark.parametrize("variant,said", [("engines:aoti", "no tiny-sd15 aoti engines in"),
                                           ("engines:aoti-fp8-static", "no tiny-sd15 aoti fp8 engines in")])
def test_engine_folder_without_the_plan_refused_before_the_load(variant, said, tmp_path, capsys, monkeypatch):
    """An --engine-dir that lacks what a variant opens: one line naming the variant and the build command, before
    the model loads (as mf-generate --engines refuses), and no report written."""
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the engine folder was checked")

    monkeypatch.setattr("megafusion.core.loading.load_model", no_load)
    (tmp_path / "e").mkdir()
    assert main(["--model", "tiny-sd15", "--device", "cpu", "--output", str(tmp_path / "out"), "--variants", variant,
                 "--engine-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mf-bench: error: --variants {variant}: {said}"), err
    assert "build them with: mf-build-engines --model tiny-sd15 --stages" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_gpu_bench_measures_peak_and_fraction(tmp_path):
    rc = main(["--model", "tiny-sdxl", "--device", "cuda", "--repeats", "2", "--warmup", "1", "--output",
               str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["peak_tflop_per_s"] > 10 and data["environment"]["device_name"]
    for v in data["variants"]:
        assert 0 < v["fraction_of_peak"] < 1
