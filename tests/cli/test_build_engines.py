"""`mf-build-engines` and `mf-generate --engines` from the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megafusion.cli import build_engines as build_cli
from megafusion.engine.cache import EngineCache
from megafusion.cli import generate as gen_cli

from tests.engines import STAGES

SDXL_ARGS = ["--model", "tiny-sdxl", "--stages", STAGES, "--device", "cpu"]


def test_second_build_skips_everything(sdxl_copy, capsys):
    before = EngineCache(sdxl_copy).manifest_path.read_bytes()
    assert build_cli.main([*SDXL_ARGS, "--output", str(sdxl_copy)]) == 0
    out = capsys.readouterr().out
    assert "0 built, 6 up to date" in out and out.count("up to date, skipped") == 6
    assert EngineCache(sdxl_copy).manifest_path.read_bytes() == before


def test_corrupt_engine_is_rebuilt_by_the_cli(sdxl_copy, capsys):
    cache = EngineCache(sdxl_copy)
    entry = next(e for e in cache.entries().values() if e.key.network == "text_encoder_2")
    (sdxl_copy / entry.files[0].path).write_bytes(b"\0" * 10)
    assert build_cli.main([*SDXL_ARGS, "--output", str(sdxl_copy)]) == 0
    out = capsys.readouterr().out
    assert "1 built, 5 up to date" in out and "text_encoder_2-fp32 (fixed shape): building" in out


@pytest.mark.parametrize("argv, named", [
    (["--model", "nope"], "'nope'"),
    (["--model", "tiny-sdxl", "--stages", "100x100:2"], "100"),
    (["--model", "tiny-sdxl", "--stages", "128x128:two"], "'two'"),
    (["--model", "tiny-sdxl", "--size", "12x"], "'12x'"),
    (["--model", "tiny-sdxl", "--dilation", "0"], "--dilation 0"),
    (["--model", "tiny-sdxl", "--backend", "tensorrt"], "tensorrt"),
    (["--model", "tiny-sdxl", "--device", "cuda"], "'cuda'"),
    (["--model", "sdxl", "--model-path", "/no/such/dir"], "/no/such/dir"),
    (["--model", "tiny-sdxl", "--device", "cpu", "--ort-optimize", "cuda"], "--ort-optimize cuda"),
    (["--model", "tiny-sdxl", "--device", "cpu", "--backend", "torch", "--ort-optimize", "cpu"], "--ort-optimize cpu"),
    (["--model", "tiny-sdxl", "--device", "cpu", "--networks", "unet,unet-wide"], "'unet-wide'"),
    (["--model", "tiny-sdxl", "--device", "cpu", "--no-dilation", "--networks", "unet-dilated"], "'unet-dilated'"),
    (["--model", "tiny-sdxl", "--device", "cpu", "--networks", ","], "--networks ','"),
])
def test_bad_input_is_one_line_and_exit_2(argv, named, tmp_path, capsys):
    assert build_cli.main([*argv, "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mf-build-engines: error:") and named in err
    assert "Traceback" not in err


def test_argparse_rejects_unknown_backend(capsys):
    with pytest.raises(SystemExit) as e:
        build_cli.main(["--model", "tiny-sdxl", "--backend", "openvino", "--output", "x"])
    assert e.value.code == 2 and "openvino" in capsys.readouterr().err


def test_corrupt_manifest_stops_the_build_naming_it(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"format": 1, "entries": [')
    assert build_cli.main([*SDXL_ARGS, "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "manifest.json") in err and err.count("\n") == 1


def test_generate_from_engines_matches_torch_cli(sdxl_engines, tmp_path, capsys):
    gen = ["--model", "tiny-sdxl", "--stages", STAGES, "--prompt", "a cat", "--no-progress", "--seed", "5"]
    assert gen_cli.main([*gen, "--engines", str(sdxl_engines), "--output", str(tmp_path / "ort.png")]) == 0
    assert "engines: onnxruntime engines (fp32)" in capsys.readouterr().out
    assert gen_cli.main([*gen, "--output", str(tmp_path / "torch.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "ort.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "torch.png")).astype(int)
    assert a.shape == b.shape == (256, 256, 3) and np.abs(a - b).max() <= 1


def test_generate_uncovered_size_names_range_and_command(sdxl_engines, tmp_path, capsys):
    argv = ["--model", "tiny-sdxl", "--stages", "128x128:2,384x320:2", "--prompt", "x", "--no-progress",
            "--engines", str(sdxl_engines), "--output", str(tmp_path / "o.png")]
    assert gen_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "384x320" in err and "they cover 256x256" in err
    assert f"mf-build-engines --model tiny-sdxl --stages 128x128:2,384x320:2 --backend onnxruntime " \
           f"--precision fp32 --device cpu --ort-optimize none --output {sdxl_engines}" in err
    assert not (tmp_path / "o.png").exists()


def test_generate_without_manifest(tmp_path, capsys):
    argv = ["--model", "tiny-sd15", "--size", "256x256", "--steps", "4", "--prompt", "x", "--no-progress",
            "--engines", str(tmp_path), "--output", str(tmp_path / "o.png")]
    assert gen_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no tiny-sd15 engines" in err and "mf-build-engines --model tiny-sd15" in err


def test_torch_backend_records_coverage_and_runs(tmp_path, capsys):
    stages = "128x128:1,256x256:1"
    assert build_cli.main(["--model", "tiny-sd15", "--stages", stages, "--backend", "torch", "--device", "cpu",
                           "--output", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {e["key"]["backend"] for e in manifest["entries"]} == {"torch"}
    assert all(e["files"] == [] for e in manifest["entries"]) and len(manifest["entries"]) == 5
    assert gen_cli.main(["--model", "tiny-sd15", "--stages", stages, "--prompt", "x", "--no-progress",
                         "--engines", str(tmp_path), "--output", str(tmp_path / "o.png")]) == 0
    assert "torch engines (fp32)" in capsys.readouterr().out and (tmp_path / "o.png").is_file()


def test_engine_precision_is_read_from_the_unet_entries():
    import torch

    from megafusion.engine.load import _choose_backend

    from tests.engine.test_cache import base_key

    def entry(**kw):
        from megafusion.engine.cache import Entry

        key = base_key(**kw)
        return Entry(key.digest(), key, (), 0.0)

    # fp16 UNet beside the fp32 VAE that SDXL keeps: the run is fp16, even on a CPU that prefers fp32.
    entries = [entry(precision="fp16"), entry(network="vae_decoder", precision="fp32")]
    assert _choose_backend(entries, torch.device("cpu"), None, None) == ("onnxruntime", "fp16")
    assert _choose_backend(entries, torch.device("cpu"), None, "fp32") is None
    both = entries + [entry(precision="fp32"), entry(backend="torch")]
    assert _choose_backend(both, torch.device("cpu"), None, None) == ("onnxruntime", "fp32")
    assert _choose_backend(both, torch.device("cpu"), "torch", None) == ("torch", "fp32")


def test_generate_with_a_precision_not_built(sdxl_engines, tmp_path, capsys):
    argv = ["--model", "tiny-sdxl", "--stages", STAGES, "--prompt", "x", "--no-progress", "--dtype", "fp16",
            "--engines", str(sdxl_engines), "--output", str(tmp_path / "o.png")]
    assert gen_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no tiny-sdxl fp16 engines" in err and "--precision fp16" in err and err.count("\n") == 1


def test_ort_optimize_defaults_follow_backend_and_device():
    from megafusion.cli.build_engines import ort_optimize_level

    assert ort_optimize_level(None, "onnxruntime", "cuda:0") == "cuda"
    assert ort_optimize_level(None, "onnxruntime", "cpu") == "none"  # the CPU default is the plain export
    assert ort_optimize_level(None, "tensorrt", "cuda:0") == "none"
    assert ort_optimize_level("cpu", "onnxruntime", "cuda:0") == "cpu"
    assert ort_optimize_level("none", "aoti", "cpu") == "none"


def test_ort_optimized_build_never_aliases_plain_and_generates_like_torch(tiny_sd15, sd15_engines, tmp_path,
                                                                         capsys):
    """`--ort-optimize cpu` into a folder of plain engines: the text encoder and VAE entries, whose keys differ
    from the plain ones only in `ort_optimize`, are built anew rather than taken as up to date; every network is
    fused (and opened on the CPU EP by the build's load check); a generation from the fused engines (the newest,
    which `open_engines` prefers) matches the torch backend."""
    import shutil

    from megafusion.engine.load import open_engines
    from megafusion.core.plan import parse_stages, validate_plan
    from megafusion.runtime.pipeline import GenerationOptions

    from tests.engines import assert_generation_matches_torch

    out = tmp_path / "engines"
    shutil.copytree(sd15_engines, out)
    plain = EngineCache(out).entries()
    argv = ["--model", "tiny-sd15", "--stages", STAGES, "--no-dilation", "--device", "cpu", "--output", str(out),
            "--ort-optimize", "cpu"]
    assert build_cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "4 built, 0 up to date" in log and log.count("ORT-optimized for cpu") == 4
    assert "vae_decoder-fp32 (128x128, 256x256): building for onnxruntime" in log
    entries = EngineCache(out).entries()
    fused = {d: e for d, e in entries.items() if d not in plain}
    assert len(entries) == len(plain) + 4 and {e.key.ort_optimize for e in fused.values()} == {"cpu"}
    assert {e.key.network for e in fused.values()} == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert all(len(e.files) == 1 and e.files[0].path.endswith("/model.onnx") for e in fused.values())  # no plain copy
    plan = validate_plan(tiny_sd15.family, parse_stages(STAGES))
    nets, _ = open_engines(out, tiny_sd15, plan, dilation=1)
    opts = GenerationOptions("a red cube", seed=3, dilation=1)
    assert_generation_matches_torch(tiny_sd15, nets, plan, opts, "ort-fused: ")
    assert build_cli.main(argv) == 0
    assert "0 built, 4 up to date" in capsys.readouterr().out


def _torch_build(tmp_path, *extra):
    return ["--model", "tiny-sdxl", "--stages", STAGES, "--backend", "torch", "--device", "cpu",
            "--output", str(tmp_path), *extra]


def test_networks_builds_only_the_named_ones_then_the_rest(tmp_path, capsys):
    assert build_cli.main(_torch_build(tmp_path, "--networks", "unet-dilated,vae_encoder")) == 0
    entries = EngineCache(tmp_path).entries().values()
    assert sorted((e.key.network, e.key.dilation) for e in entries) == [("unet", 2), ("vae_encoder", 1)]
    facts = json.loads((tmp_path / "models.json").read_text())["models"]["tiny-sdxl"]["weights"]
    assert set(facts) == {"unet", "vae_encoder"}
    capsys.readouterr()
    assert build_cli.main(_torch_build(tmp_path)) == 0  # the whole plan: only what is missing is built
    assert "4 built, 2 up to date" in capsys.readouterr().out
    facts = json.loads((tmp_path / "models.json").read_text())["models"]["tiny-sdxl"]["weights"]
    assert set(facts) == {"unet", "vae_encoder", "vae_decoder", "text_encoder", "text_encoder_2"}


def test_a_whole_build_keeps_the_memory_estimate_the_first_run_asks_for(tmp_path, capsys):
    """mf-build-engines leaves the plan's estimate in the folder (a fresh machine's first run spent 13 s on it);
    a --networks part leaves none, and mf-generate --engines then reuses the kept one instead of computing it."""
    assert build_cli.main(_torch_build(tmp_path, "--networks", "unet")) == 0
    assert not (tmp_path / "memory-estimates.json").exists()
    capsys.readouterr()
    assert build_cli.main(_torch_build(tmp_path)) == 0
    assert "memory estimates for mf-generate: 1 computed, 0 already kept" in capsys.readouterr().out
    assert gen_cli.main(["--model", "tiny-sdxl", "--stages", STAGES, "--prompt", "x", "--engines", str(tmp_path),
                         "--dry-run"]) == 0
    assert "memory estimates: 1 reused, 0 computed" in capsys.readouterr().out
    assert gen_cli.main(["--model", "tiny-sdxl", "--stages", STAGES, "--prompt", "x", "--engines", str(tmp_path),
                         "--dry-run", "--relay", "latent"]) == 0  # another relay: not kept by the build
    assert "memory estimates: 0 reused, 1 computed" in capsys.readouterr().out


def test_disjoint_network_builds_run_at_once_into_one_folder(tmp_path):
    """Two processes commit into one manifest under the cache's lock; neither loses the other's entries."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "megafusion.cli.build_engines"]
    procs = [subprocess.Popen([*cmd, *_torch_build(tmp_path, "--networks", sel)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for sel in ("unet,text_encoder", "vae_decoder,vae_encoder,text_encoder_2")]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    entries = EngineCache(tmp_path).entries().values()
    assert sorted(e.key.network for e in entries) == sorted(
        ["unet", "unet", "text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder"])
    facts = json.loads((tmp_path / "models.json").read_text())["models"]["tiny-sdxl"]["weights"]
    assert len(facts) == 5
