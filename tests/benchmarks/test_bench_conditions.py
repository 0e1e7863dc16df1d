"""mf-bench with the extra conditions (benchmarks/conditions.py): each variant's conditioned row beside its plain row
in one run, its cost counted with the ControlNet and the image-to-image entry, its set-up (a LoRA) timed apart, the
rows running what they name, and mf-generate's refusals. tiny-sd15 on CPU; never the speed."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.benchmarks.conditions import Conditions
from megafusion.benchmarks.flops import ControlNetCostCounter, MetaCostCounter, conditioned_plan_cost, plan_cost
from megafusion.cli.bench import main
from megafusion.core.loading import load_model
from megafusion.core.lora import LoraSpec, fuse_loras
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.runtime.img2img import ImageStart, read_image
from tests.cli.refusals import refused
from tests.core.test_lora import _random_lora, save_diffusers
from tests.runtime.test_controlnet import save_tiny_controlnet

STAGES = "128x128:1,192x192:1"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A LoRA, a ControlNet, a control image and a photo for tiny-sd15."""
    d = tmp_path_factory.mktemp("conditions")
    base = load_model("tiny-sd15")
    lora = save_diffusers(_random_lora(base), d / "style.safetensors")
    cn = save_tiny_controlnet(base.unet, d / "cn", 3)
    for name, seed in (("edges.png", 0), ("photo.png", 1)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 64, 3), dtype=np.uint8)).save(d / name)
    return {"lora": lora, "cn": cn, "edges": d / "edges.png", "photo": d / "photo.png"}


def _args(inputs, out, *extra):
    return ["--model", "tiny-sd15", "--device", "cpu", "--stages", STAGES, "--repeats", "1", "--warmup", "0",
            "--prompt", "a kite", "--lora", f"{inputs['lora']}:0.5", "--controlnet", str(inputs["cn"]),
            "--control-image", str(inputs["edges"]), "--image", str(inputs["photo"]), "--strength", "0.5",
            "--output", str(out), *extra]


def test_conditioned_rows_beside_the_plain_ones(inputs, tmp_path):
    assert main(_args(inputs, tmp_path)) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {v["name"]: v for v in data["variants"]}
    label = "lora style x0.5 + controlnet cn + image to image"
    assert [v["name"] for v in data["variants"]] == ["direct", "diffusers eager", "engine: torch",
                                                     f"engine: torch + {label}"]
    cond, plain = rows[f"engine: torch + {label}"], rows["engine: torch"]
    assert cond["role"] == "conditioned" and cond["pair"] == "engine: torch"
    assert cond["setup_s"] is not None and cond["setup_s"] >= 0 and "LoRA fused" in cond["setup"]
    assert plain["setup_s"] is None and cond["median_s"] > 0
    # strength 0.5 of 2 steps: stage 1 is skipped, the photo enters stage 2 at its first step
    assert [s["name"] for s in cond["segments"]] == ["text encoders", "encode image", "stage 2 (192x192, 1 steps)",
                                                     "decode"]
    assert all(s["median_s"] is not None for s in cond["segments"])  # timed segments joined by name and order
    fam = load_model("tiny-sd15").family
    plan = validate_plan(fam, parse_stages(STAGES))
    counter = MetaCostCounter(fam)
    cn = ControlNetCostCounter(fam, str(inputs["cn"]))
    st = plan.stages[1]
    stage = counter.unet(st.height, st.width, 2, 2) + cn.step(st.height, st.width, 2, 2)
    vae = counter.vae_encode(st.height, st.width).flops + counter.vae_decode(st.height, st.width).flops
    assert cond["true_tflop"] == pytest.approx((stage.flops + vae) / 1e12)
    assert cond["paper_gmacs"] == pytest.approx(stage.macs / 1e9)
    assert plain["true_tflop"] == pytest.approx(plan_cost(counter, plan).true_tflop)
    assert data["settings"]["conditions"]["image"] == {"strength": 0.5, "start_stage": 2, "steps_run": 1}
    assert data["settings"]["conditions"]["lora"] == [{"path": str(inputs["lora"]), "scale": 0.5}]
    assert not [s for s in data["speedups"] if label in s["engine"]]  # compared with its plain row, not direct
    md = (tmp_path / "report.md").read_text()
    assert "## Conditioned against plain" in md and f"| engine: torch + {label} | engine: torch |" in md


def test_cost_only_counts_the_conditioned_plan(inputs, tmp_path):
    assert main(["--model", "tiny-sd15", "--stages", STAGES, "--cost-only", "--controlnet", str(inputs["cn"]),
                 "--control-image", str(inputs["edges"]), "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert [(v["name"], v["role"]) for v in rows] == [("direct", "direct"), ("MegaFusion", "engine"),
                                                      ("MegaFusion + controlnet cn", "conditioned")]
    fam = load_model("tiny-sd15").family
    plan = validate_plan(fam, parse_stages(STAGES))
    counter, cn = MetaCostCounter(fam), ControlNetCostCounter(fam, str(inputs["cn"]))
    extra = sum((cn.step(s.height, s.width, 2, 1 if k == 0 else 2).flops * s.steps for k, s in enumerate(plan.stages)))
    assert rows[2]["true_tflop"] == pytest.approx(rows[1]["true_tflop"] + extra / 1e12)
    assert extra > 0


def test_plan_cost_without_conditions_is_unchanged():
    from megafusion.core.families import TINY_SDXL

    counter = MetaCostCounter(TINY_SDXL)
    plan = validate_plan(TINY_SDXL, parse_stages("128x128:3,256x256:2"))
    assert conditioned_plan_cost(counter, plan) == plan_cost(counter, plan)
    assert conditioned_plan_cost(counter, plan, cfg=False) == plan_cost(counter, plan, cfg=False)


@pytest.mark.slow
def test_rows_run_what_they_name(inputs, monkeypatch):
    """The conditioned row's latent is the one of a model with the LoRA fused, the ControlNet on its step and the
    photo as its start (built here independently); the plain row's is the base model's (the LoRA went into a copy)."""
    from megafusion.benchmarks.variants import default_variants
    from megafusion.engine.networks import TorchNetworks
    from megafusion.runtime.controlnet import Control, ControlledNetworks, load_controlnet, read_control_image
    from megafusion.runtime.pipeline import GenerationOptions, MegaFusionPipeline

    bundle = load_model("tiny-sd15")
    plan = validate_plan(bundle.family, parse_stages(STAGES))
    opts = GenerationOptions("a kite", seed=3)
    control = read_control_image(inputs["edges"])
    image = ImageStart(read_image(inputs["photo"]), 0.5)
    conds = Conditions((LoraSpec(inputs["lora"], 0.5),), ((str(inputs["cn"]), control, 0.8, 0.0, 1.0),), image)
    latents = []
    real = MegaFusionPipeline.generate

    def recording(self, *a, **k):
        r = real(self, *a, **k)
        latents.append(r.latent)
        return r

    monkeypatch.setattr(MegaFusionPipeline, "generate", recording)
    rows = default_variants(bundle, plan, opts, "cpu", ("torch",), conditions=conds)
    assert [r.role for r in rows] == ["direct", "baseline", "engine", "conditioned"]
    rows[2].generate()
    rows[3].setup()
    rows[3].generate()
    plain, cond = latents
    monkeypatch.setattr(MegaFusionPipeline, "generate", real)
    ref_plain = MegaFusionPipeline(load_model("tiny-sd15")).generate(plan, opts).latent
    lora = load_model("tiny-sd15")
    fuse_loras(lora, [LoraSpec(inputs["lora"], 0.5)])
    nets = ControlledNetworks(TorchNetworks(lora), [Control(load_controlnet(inputs["cn"], lora.unet, "cpu",
                                                                            torch.float32), control, 0.8)], "cpu")
    ref_cond = MegaFusionPipeline(lora, nets, "cpu").generate(plan, opts, image=image).latent
    assert torch.equal(plain, ref_plain)
    assert (cond - ref_cond).abs().max() <= 1e-5  # the same computation on two copies of the weights
    assert (ref_cond - ref_plain).abs().max() > 0.05  # the conditions act


@pytest.mark.parametrize("extra, needles", [
    (["--lora", "/nowhere/style.safetensors"], ["--lora '/nowhere/style.safetensors': no such file"]),
    (["--strength", "0.5"], ["--strength and --start-stage need --image"]),
    (["--image", "/nowhere.png"], ["--image", "/nowhere.png"]),
    (["--controlnet", "CN"], ["1 --controlnet and 0 --control-image"]),
    (["--controlnet", "CN", "--control-image", "EDGES", "--lora", "LORA", "--variants", "engines:onnxruntime",
      "--engine-dir", "DIR"], ["the ControlNet engines hold the base UNet"]),
    (["--image", "PHOTO", "--strength", "1.5"], ["--strength 1.5: must be a number in (0, 1]"]),
])
def test_refusals_are_one_line_before_the_load(inputs, tmp_path, capsys, monkeypatch, extra, needles):
    monkeypatch.setattr("megafusion.core.loading.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    names = {"CN": str(inputs["cn"]), "EDGES": str(inputs["edges"]), "LORA": str(inputs["lora"]),
             "DIR": str(tmp_path), "PHOTO": str(inputs["photo"])}
    extra = [names.get(x, x) for x in extra]
    refused("mf-bench", ["--model", "tiny-sd15", "--device", "cpu", "--output", str(tmp_path / "o"), *extra],
            capsys, *needles)
    assert not (tmp_path / "o").exists()


def test_if_refuses_the_conditions(inputs, tmp_path, capsys):
    refused("mf-bench", ["--model", "tiny-if", "--output", str(tmp_path / "o"), "--lora", str(inputs["lora"])],
            capsys, "--lora: mf-bench takes the extra conditions for the latent families")


def _engine_bench(stages):
    return ["--model", "tiny-sd15", "--device", "cpu", "--stages", stages, "--repeats", "1", "--warmup", "0",
            "--prompt", "a kite", "--variants", "engines:onnxruntime", "--direct-for", "none"]


@pytest.mark.slow
def test_engine_variant_swaps_the_lora(inputs, sd15_engines, tmp_path):
    """engines:onnxruntime: the LoRA is swapped into the engines the plain row ran, the swap in its own column."""
    from tests.engines import STAGES as stages

    base = _engine_bench(stages)
    assert main([*base, "--engine-dir", str(sd15_engines), "--lora", str(inputs["lora"]), "--output",
                 str(tmp_path / "lora")]) == 0
    rows = json.loads((tmp_path / "lora" / "results.json").read_text())["variants"]
    assert [v["name"] for v in rows] == ["direct", "diffusers eager", "engine: engines:onnxruntime",
                                         "engine: engines:onnxruntime + lora style x1"]
    assert rows[3]["setup_s"] > 0 and rows[3]["setup"] == "LoRA swapped into the engines"
    assert rows[3]["true_tflop"] == pytest.approx(rows[2]["true_tflop"])  # a LoRA costs nothing per step


@pytest.mark.slow
def test_engine_variant_runs_the_controlnet_engines(inputs, sd15_control_ort, tmp_path, monkeypatch):
    """engines:onnxruntime with --controlnet: the conditioned row runs the ControlNet engines, the plain UNet engines
    left closed. The engines (the plain ones and a tiny ControlNet 'cn''s, built by mf-build-engines --controlnet)
    are the session's (tests/conftest.py `sd15_control_ort`), copied."""
    from tests.engines import STAGES as stages

    base = _engine_bench(stages)
    built, cn, _ = sd15_control_ort
    folder = tmp_path / "engines"
    shutil.copytree(built, folder)
    import megafusion.engine.load as load

    opened, real = [], load.open_entry
    monkeypatch.setattr(load, "open_entry", lambda d, e, b, c: opened.append(e.key.network) or real(d, e, b, c))
    assert main([*base, "--engine-dir", str(folder), "--controlnet", str(cn), "--control-image",
                 str(inputs["edges"]), "--output", str(tmp_path / "cn")]) == 0
    rows = json.loads((tmp_path / "cn" / "results.json").read_text())["variants"]
    assert rows[3]["name"] == "engine: engines:onnxruntime + controlnet cn" and rows[3]["median_s"] > 0
    assert rows[3]["true_tflop"] > rows[2]["true_tflop"]
    assert opened.count("unet") == 2  # the plain row's two (dilation 1 and 2); none for the conditioned row


def test_controlnet_for_another_model_is_refused_before_timing(inputs, tiny_sdxl, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("megafusion.benchmarks.bench.measure", lambda *a, **k: pytest.fail("timed before refusing"))
    from diffusers.utils import logging as diffusers_logging

    other = save_tiny_controlnet(tiny_sdxl.unet, tmp_path / "xl-cn", 1)
    # diffusers' load-time notes (no accelerate) are not the refusal; a handler an earlier test left on a closed
    # capture stream would add its own error lines
    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        refused("mf-bench", ["--model", "tiny-sd15", "--device", "cpu", "--stages", STAGES, "--controlnet",
                             str(other), "--control-image", str(inputs["edges"]), "--output", str(tmp_path / "o")],
                capsys, f"--controlnet {str(other)!r}:", "does not match the UNet's")
    finally:
        diffusers_logging.set_verbosity(before)
