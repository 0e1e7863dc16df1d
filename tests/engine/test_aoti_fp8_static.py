"""FP8 AOTInductor packages with static input scales (`mf-build-engines --precision fp8 --fp8-scales static`): each
stage shape's UNet package is calibrated at that shape (runtime/fp8_calibration.py `package_calibrator`); Inductor
folds the scales into the package's code and the entry records them in static_scales.json. The session copies
test_aoti_fp8's folder (per-token FP8 UNet, fp16 text encoder, fp32 VAE) and builds the same UNet with static scales
beside it, its weights apart (tests/conftest.py FP8_STATIC_DRIVER, about 40-65 s on 2 cores).

Tolerances: package against the eager FP8 module with the same static scales, relative L2 of eps, bound 5% as in
test_aoti_fp8 (Inductor rounds to bf16 elsewhere than eager does; measured there 1.3-1.4% for per-token packages).
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.families import get_family
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.engine.cache import EngineCache
from megafusion.engine.fp8 import is_static_scheme
from megafusion.engine.load import CoverageError, open_engines

from tests.background import BUILDS
from tests.engine.test_aoti_fp8 import FP8_LAYERS, PLAN

pytestmark = pytest.mark.slow


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def fp8_static_engines():
    BUILDS.get("aoti_fp8_static")
    return BUILDS.folder("aoti-fp8-static")


def _unets(folder):
    entries = [e for e in EngineCache(folder).entries().values() if e.key.network == "unet"]
    static = [e for e in entries if is_static_scheme(e.key.quantization)]
    token = [e for e in entries if not is_static_scheme(e.key.quantization)]
    return static, token


def _runner(folder, e):
    """The entry opened as the runtime opens it (its weights apart read by the backend)."""
    from megafusion.engine.backend import OpenContext, get_backend
    from megafusion.engine.load import open_entry

    return open_entry(folder, e, get_backend("aoti"), OpenContext(get_family("tiny-sd15"), torch.device("cpu")))


def _eager_static(profile, spec):
    """The build's module, made again: tiny-sd15 prepared, its bf16 FP8 copy calibrated at the package's shape."""
    from megafusion.core.loading import load_model
    from megafusion.engine.aoti_backend import fp8_unet, prepare_for_export
    from megafusion.runtime.fp8_calibration import package_calibrator

    bundle = load_model("tiny-sd15")
    calibrate = package_calibrator(bundle)  # encodes with the text encoders as loaded, as the build did
    prepare_for_export(bundle.unet, "unet")
    module = fp8_unet(bundle.unet, "cpu")
    scales = calibrate(module, spec, profile)
    return module, scales


def test_both_fp8_unets_side_by_side_with_their_own_keys(fp8_static_engines):
    (static,), (token,) = _unets(fp8_static_engines)
    assert static.key.quantization.startswith(token.key.quantization + "; static inputs (calibration ")
    assert static.key.profiles == token.key.profiles and static.digest != token.digest
    assert static.key.constants == "apart"


def test_the_entry_records_the_scales_calibrated_at_its_shape(fp8_static_engines):
    """Inductor folds the scales into the package's code; the entry keeps them beside it (`FP8_SCALES_FILE`, after
    model.pt2 in the entry's files), as this test's own calibration of the build's module gives them."""
    import json

    from megafusion.engine.aoti_backend import FP8_SCALES_FILE

    (static,), (token,) = _unets(fp8_static_engines)
    names = [f.path.rsplit("/", 1)[-1] for f in static.files]
    assert names == ["model.pt2", FP8_SCALES_FILE, "weights.safetensors"]
    assert not any(f.path.endswith(FP8_SCALES_FILE) for f in token.files)
    rec = json.loads((fp8_static_engines / static.files[1].path).read_text())
    assert rec["quantization"] == static.key.quantization
    _, scales = _eager_static(static.key.profiles[0], _runner(fp8_static_engines, static).spec)
    assert len(rec["scales"]) == len(scales) == FP8_LAYERS
    for name, s in scales.items():
        assert rec["scales"][name] == pytest.approx(s, rel=1e-6), name


def test_static_package_against_its_eager_module_and_the_per_token_package(fp8_static_engines):
    from megafusion.core.wrappers import wrap

    (static,), (token,) = _unets(fp8_static_engines)
    srun, trun = _runner(fp8_static_engines, static), _runner(fp8_static_engines, token)
    module, _ = _eager_static(static.key.profiles[0], srun.spec)
    eager = wrap(module, srun.spec, False).eval()
    g = torch.Generator().manual_seed(11)
    for t in (981.0, 500.0, 21.0):
        x, ehs = torch.randn(2, 4, 16, 16, generator=g).bfloat16(), torch.randn(2, 77, 32, generator=g).bfloat16()
        ts = torch.tensor([t])
        inputs = {"sample": x, "timestep": ts, "encoder_hidden_states": ehs}
        got, per_token = srun.run(inputs)["eps"], trun.run(inputs)["eps"]
        with torch.no_grad():
            want = eager(x, ts, ehs)
        assert _rel(got, want) < 0.05, t
        assert 1e-4 < _rel(got, per_token) < 0.05, t  # other scales, the same network


def test_open_and_generate_from_static_fp8_engines(tiny_sd15, fp8_static_engines):
    from megafusion.engine.networks import TorchNetworks
    from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

    fam = get_family("tiny-sd15")
    plan = validate_plan(fam, parse_stages(PLAN))
    nets, desc = open_engines(fp8_static_engines, tiny_sd15, plan, dilation=1, relay="latent", precision="fp8",
                              fp8_scales="static")
    assert desc.startswith("aoti engines (fp8, static input scales)") and nets.capturable
    (static,), (token,) = _unets(fp8_static_engines)
    assert nets.weights["unet"] == static.key.weights
    opts = GenerationOptions("a red cube", negative_prompt="blurry", seed=3, relay="latent", dilation=1)
    got = MegaFusionPipeline(tiny_sd15, nets, "cpu").generate(plan, opts)
    ref = MegaFusionPipeline(tiny_sd15, TorchNetworks(tiny_sd15), "cpu").generate(plan, opts)
    assert torch.isfinite(got.latent).all() and 1e-4 < _rel(got.latent, ref.latent) < 0.10
    # the per-token packages still open as before, and open other files
    tnets, tdesc = open_engines(fp8_static_engines, tiny_sd15, plan, dilation=1, relay="latent", precision="fp8")
    assert tdesc.startswith("aoti engines (fp8) from")
    assert tnets.runners[("unet", 1)].path != nets.runners[("unet", 1)].path


def test_static_scales_asked_of_a_folder_without_them(tiny_sd15, fp8_static_engines):
    """test_aoti_fp8's folder (built before this file's, which copies it) holds per-token FP8 packages only: asking
    for static ones names the build."""
    fam = get_family("tiny-sd15")
    plan = validate_plan(fam, parse_stages(PLAN))
    with pytest.raises(CoverageError,
                       match=r"do not cover unet \(standard, fp8, static input scales\).*--fp8-scales static"):
        open_engines(BUILDS.folder("aoti-fp8"), tiny_sd15, plan, dilation=1, relay="latent", precision="fp8",
                     fp8_scales="static")


def test_mf_generate_and_mf_serve_give_the_same_png(fp8_static_engines, tmp_path, capsys):
    from megafusion.cli.generate import main
    from megafusion.serve.config import ServeConfig
    from megafusion.serve.model import ModelServer
    from megafusion.serve.request import parse_request

    out = tmp_path / "a.png"
    assert main(["--model", "tiny-sd15", "--prompt", "a cube", "--seed", "5", "--no-progress", "--stages", PLAN,
                 "--device", "cpu", "--engines", str(fp8_static_engines), "--precision", "fp8", "--fp8-scales",
                 "static", "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "aoti engines (fp8, static input scales)" in said and out.is_file(), said
    server = ModelServer(ServeConfig("tiny-sd15", engines=str(fp8_static_engines), precision="fp8",
                                     fp8_scales="static", sizes=((128, 128),)))
    got = server.generate(parse_request({"prompt": "a cube", "stages": PLAN, "seed": 5}, server.family))
    assert got.png == out.read_bytes()
    assert "static input scales" in server.describe()["engines"]


def test_mf_bench_times_both_kinds_in_one_run(fp8_static_engines, tmp_path):
    import json

    from megafusion.cli.bench import main

    assert main(["--model", "tiny-sd15", "--device", "cpu", "--stages", PLAN, "--variants",
                 "engines:aoti-fp8,engines:aoti-fp8-static", "--direct-for", "none", "--engine-dir",
                 str(fp8_static_engines), "--repeats", "1", "--warmup", "0", "--no-peak", "--output",
                 str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["variants"]}
    assert rows["engine: engines:aoti-fp8"]["median_s"] > 0 and rows["engine: engines:aoti-fp8-static"]["median_s"] > 0


@pytest.mark.gpu
def test_static_fp8_package_built_on_cuda_against_its_eager_module(tmp_path):
    """The CUDA build (Hopper's or Ada's `_scaled_mm` with the static scale expanded per row) against the eager
    FP8 module calibrated the same way on the GPU; test_aoti_fp8's bound."""
    from megafusion.core.loading import load_model
    from megafusion.core.specs import network_spec
    from megafusion.core.wrappers import wrap
    from megafusion.engine.aoti_backend import AotiRunner, fp8_unet, prepare_for_export
    from megafusion.engine.build import BuildRequest, build_engines
    from megafusion.engine.fp8 import fp8_unavailable
    from megafusion.runtime.fp8_calibration import package_calibrator

    if fp8_unavailable("cuda"):
        pytest.skip(fp8_unavailable("cuda"))
    fam = get_family("tiny-sd15")
    plan = validate_plan(fam, parse_stages(PLAN))
    bundle = load_model("tiny-sd15")
    build_engines(bundle, BuildRequest(plan, "aoti", "fp8", tmp_path, dilation=1, device="cuda", networks=("unet",),
                                       fp8_scales="static", fp8_calibrate=package_calibrator(bundle)))
    (e,) = EngineCache(tmp_path).entries().values()
    assert "static inputs" in e.key.quantization
    runner = AotiRunner(tmp_path / e.files[0].path, network_spec(fam, "unet", "fp8", 1), e.key.profiles[0],
                        "tiny-sd15", "cuda")
    ref = load_model("tiny-sd15")
    calibrate = package_calibrator(ref)
    prepare_for_export(ref.unet, "unet")
    module = fp8_unet(ref.unet, "cuda")
    calibrate(module, runner.spec, e.key.profiles[0])
    eager = wrap(module, runner.spec, False).eval()
    g = torch.Generator().manual_seed(0)
    for t in (981.0, 21.0):
        x = torch.randn(2, 4, 16, 16, generator=g).to("cuda", torch.bfloat16)
        ehs = torch.randn(2, 77, 32, generator=g).to("cuda", torch.bfloat16)
        ts = torch.tensor([t], device="cuda")
        got = runner.run({"sample": x, "timestep": ts, "encoder_hidden_states": ehs})["eps"]
        with torch.no_grad():
            want = eager(x, ts, ehs)
        assert _rel(got, want) < 0.05, t
