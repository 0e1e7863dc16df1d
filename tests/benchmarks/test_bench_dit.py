"""mf-bench for SD3 / FLUX (benchmarks/dit_bench.py, cli/bench_dit.py): each variant beside direct, and with the
extra conditions a conditioned row after its plain row in one run, its cost the plain plan's plus what the
conditions count (benchmarks/dit_conditions.py), the rows running what they name. tiny-sd3 / tiny-flux on CPU;
never the speed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megafusion.benchmarks.dit_conditions import (DiTControlNetCostCounter, DiTIPAdapterCostCounter,
                                                  dit_conditioned_plan_cost)
from megafusion.benchmarks.dit_flops import DiTCostCounter, dit_plan_cost
from megafusion.cli.bench import main
from megafusion.core.families import FAMILIES
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.runtime.flow_pipeline import FlowMegaFusionPipeline

STAGES = "128x128:1,160x160:1"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """ControlNets, LoRAs and IP-Adapters (with their image encoders) for tiny-sd3 and tiny-flux, a control image
    and a photo."""
    from tests.cli.test_generate_flow import _dit_lora
    from tests.runtime.test_flow_controlnet import save_tiny_flow_controlnet
    from tests.runtime.test_flow_ipadapter import save_tiny_flux_ip_adapter
    from tests.runtime.test_flow_ipadapter_sd3 import save_tiny_sd3_ip_adapter, save_tiny_siglip
    from tests.runtime.test_ipadapter import save_tiny_image_encoder

    d = tmp_path_factory.mktemp("dit-conditions")
    out = {}
    for name in ("tiny-sd3", "tiny-flux"):
        out[f"cn-{name}"] = str(save_tiny_flow_controlnet(FAMILIES[name], d / f"cn-{name}", seed=1))
        out[f"lora-{name}"] = str(_dit_lora(name, d / f"style-{name}.safetensors"))
    out["cn-xlabs"] = str(save_tiny_flow_controlnet(FAMILIES["tiny-flux"], d / "cn-xlabs", seed=2, xlabs=True))
    out["ip-tiny-sd3"] = str(save_tiny_sd3_ip_adapter(FAMILIES["tiny-sd3"].transformer, d / "ip-sd3.safetensors"))
    out["enc-tiny-sd3"] = str(save_tiny_siglip(d / "siglip"))
    out["ip-tiny-flux"] = str(save_tiny_flux_ip_adapter(FAMILIES["tiny-flux"].transformer, d / "ip-flux.safetensors"))
    out["enc-tiny-flux"] = str(save_tiny_image_encoder(d / "clip"))
    for name, seed in (("edges.png", 0), ("photo.png", 1)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 64, 3), dtype=np.uint8)).save(d / name)
    out["edges"], out["photo"] = str(d / "edges.png"), str(d / "photo.png")
    return out


@pytest.fixture
def ran(monkeypatch):
    """What each generation ran: (networks class, networks' transformer, image given, plan described)."""
    seen = []
    original = FlowMegaFusionPipeline.generate

    def recording(self, plan, opts, *a, **k):
        seen.append((type(self.nets).__name__, self.bundle.transformer, k.get("image") is not None, plan.describe()))
        return original(self, plan, opts, *a, **k)

    monkeypatch.setattr(FlowMegaFusionPipeline, "generate", recording)
    return seen


def _plan(name):
    return validate_plan(FAMILIES[name], parse_stages(STAGES))


def _rows(out):
    data = json.loads((out / "results.json").read_text())
    return data, {v["name"]: v for v in data["variants"]}


def test_sd3_controlnet_and_image_row_beside_the_plain_one(inputs, tmp_path, ran):
    assert main(["--model", "tiny-sd3", "--device", "cpu", "--stages", STAGES, "--repeats", "1", "--warmup", "0",
                 "--prompt", "a kite", "--controlnet", inputs["cn-tiny-sd3"], "--control-image", inputs["edges"],
                 "--image", inputs["photo"], "--strength", "0.5", "--output", str(tmp_path)]) == 0
    data, rows = _rows(tmp_path)
    label = "controlnet cn-tiny-sd3 + image to image"
    assert [v["name"] for v in data["variants"]] == ["direct", "engine: torch", f"engine: torch + {label}"]
    cond, plain = rows[f"engine: torch + {label}"], rows["engine: torch"]
    assert cond["role"] == "conditioned" and cond["pair"] == "engine: torch" and cond["median_s"] > 0
    # strength 0.5 of 2 steps: stage 1 skipped, the photo enters stage 2 at its first step
    assert [s["name"] for s in cond["segments"]] == ["text encoders", "control images", "encode image",
                                                     "stage 2 (160x160, 1 steps)", "decode"]
    assert all(s["median_s"] is not None for s in cond["segments"])  # timed segments joined in order
    # The rows ran what they name: plain on the plain networks, the conditioned row controlled, from the photo.
    assert [(r[0], r[2]) for r in ran] == [("FlowTorchNetworks", False), ("FlowTorchNetworks", False),
                                           ("ControlledFlowNetworks", True)]
    fam, plan = FAMILIES["tiny-sd3"], _plan("tiny-sd3")
    counter = DiTCostCounter(fam)
    cn = DiTControlNetCostCounter(counter, inputs["cn-tiny-sd3"])
    assert plain["true_tflop"] == pytest.approx(dit_plan_cost(counter, plan, cfg=True).true_tflop, rel=1e-12)
    st = plan.stages[1]
    step = counter.transformer(st.height, st.width, 2) + cn.step(st.height, st.width, 2)  # CFG batch 2
    encodes = sum(counter.vae_encode(s.height, s.width).flops for s in plan.stages)  # control image per stage
    want = step.flops + encodes + counter.vae_encode(st.height, st.width).flops \
        + counter.vae_decode(st.height, st.width).flops
    assert cond["true_tflop"] == pytest.approx(want / 1e12, rel=1e-12)
    assert cond["paper_gmacs"] == pytest.approx(step.macs / 1e9, rel=1e-12)
    assert data["settings"]["conditions"]["image"] == {"strength": 0.5, "start_stage": 2, "steps_run": 1}
    assert "## Conditioned against plain" in (tmp_path / "report.md").read_text()


def test_flux_lora_and_ip_adapter_run_on_a_copy(inputs, tmp_path, ran):
    assert main(["--model", "tiny-flux", "--device", "cpu", "--stages", STAGES, "--repeats", "1", "--warmup", "0",
                 "--prompt", "a kite", "--lora", f"{inputs['lora-tiny-flux']}:0.8", "--ip-adapter",
                 inputs["ip-tiny-flux"], "--ip-adapter-image", inputs["photo"], "--ip-adapter-encoder",
                 inputs["enc-tiny-flux"], "--ip-adapter-scale", "0.7", "--output", str(tmp_path)]) == 0
    data, rows = _rows(tmp_path)
    label = "lora style-tiny-flux x0.8 + ip-adapter ip-flux x0.7"
    cond, plain = rows[f"engine: torch + {label}"], rows["engine: torch"]
    assert cond["setup_s"] is not None and "LoRA fused" in cond["setup"] and plain["setup_s"] is None
    # the conditioned row's transformer is a copy (LoRA fused, adapter in); the plain rows keep the base one
    (_, base, _, _), (_, base2, _, _), (kind, copy, _, _) = ran
    assert base is base2 and copy is not base and kind == "FlowIPAdapterNetworks"
    assert not hasattr(next(iter(base.attn_processors.values())), "to_k_ip")
    fam, plan = FAMILIES["tiny-flux"], _plan("tiny-flux")
    counter = DiTCostCounter(fam)
    ip = DiTIPAdapterCostCounter(fam, inputs["ip-tiny-flux"], inputs["enc-tiny-flux"])
    want = dit_conditioned_plan_cost(counter, plan, cfg=False, transformer_step=ip.transformer)
    assert cond["true_tflop"] == pytest.approx(want.true_tflop, rel=1e-12)
    extra = sum((ip.transformer(s.height, s.width, 1).flops - counter.transformer(s.height, s.width, 1).flops)
                * s.steps for s in plan.stages)
    assert extra > 0 and cond["true_tflop"] == pytest.approx(plain["true_tflop"] + extra / 1e12, rel=1e-12)
    assert data["settings"]["conditions"]["ip_adapter"]["scale"] == 0.7


def test_engines_variant_runs_the_folders_transformer(flux_aoti, inputs, tmp_path, monkeypatch, capsys):
    """--variants torch,engines:aoti --engine-dir DIR --direct-for engines:aoti: the engines row and its direct row
    run the folder's transformer packages (the session's tiny-flux folder: 128 and 160 shapes), the torch rows the
    module; the folder is checked before any load: a stage shape it lacks, conditions with the engines and no
    --engine-dir are each one line."""
    from tests.conftest import FLUX_AOTI_STAGES

    seen = []
    original = FlowMegaFusionPipeline.generate

    def recording(self, plan, opts, *a, **k):
        seen.append((type(self.nets.transformer_fn).__name__, plan.describe()))
        return original(self, plan, opts, *a, **k)

    monkeypatch.setattr(FlowMegaFusionPipeline, "generate", recording)
    base = ["--model", "tiny-flux", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--prompt", "a kite",
            "--variants", "torch,engines:aoti", "--engine-dir", str(flux_aoti[0])]
    assert main([*base, "--stages", FLUX_AOTI_STAGES, "--direct-for", "engines:aoti", "--output",
                 str(tmp_path / "a")]) == 0
    data, rows = _rows(tmp_path / "a")
    assert [v["name"] for v in data["variants"]] == ["direct", "engine: torch", "direct (engines:aoti)",
                                                     "engine: engines:aoti"]
    assert rows["engine: engines:aoti"]["median_s"] > 0 and rows["direct (engines:aoti)"]["median_s"] > 0
    direct, plan = _plan_of("160x160:3"), _plan_of(FLUX_AOTI_STAGES)
    assert [(cls, d) for cls, d in seen] == [("FluxTransformer2DModel", direct), ("FluxTransformer2DModel", plan),
                                             ("EngineTransformer", direct), ("EngineTransformer", plan)]
    capsys.readouterr()
    for args, needle in [
        (["--stages", "128x128:2,192x192:1"], "--variants engines:aoti: "),
        (["--stages", FLUX_AOTI_STAGES, "--controlnet", inputs["cn-tiny-flux"], "--control-image", inputs["edges"]],
         "with --variants engines:aoti: tiny-flux's conditioned rows run the torch variants only"),
    ]:
        assert main([*base, *args, "--output", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert main([*base[:-2], "--stages", FLUX_AOTI_STAGES, "--output", str(tmp_path / "b")]) == 2
    assert "needs --engine-dir" in capsys.readouterr().err
    assert not (tmp_path / "b" / "results.json").exists()


def _plan_of(stages: str) -> str:
    return validate_plan(FAMILIES["tiny-flux"], parse_stages(stages)).describe()


def test_cost_only_flux_controlnet_and_sd3_ip_adapter(inputs, tmp_path):
    assert main(["--model", "tiny-flux", "--stages", STAGES, "--cost-only", "--controlnet", inputs["cn-tiny-flux"],
                 "--control-image", inputs["edges"], "--output", str(tmp_path / "flux")]) == 0
    rows = json.loads((tmp_path / "flux" / "results.json").read_text())["variants"]
    assert [(v["name"], v["role"]) for v in rows] == [("direct", "direct"), ("MegaFusion", "engine"),
                                                      ("MegaFusion + controlnet cn-tiny-flux", "conditioned")]
    plan = _plan("tiny-flux")
    counter = DiTCostCounter(FAMILIES["tiny-flux"])
    cn = DiTControlNetCostCounter(counter, inputs["cn-tiny-flux"])
    extra = sum(cn.step(s.height, s.width, 1).flops * s.steps + counter.vae_encode(s.height, s.width).flops
                for s in plan.stages)  # FLUX: one pass per step, no CFG batch
    assert extra > 0 and rows[2]["true_tflop"] == pytest.approx(rows[1]["true_tflop"] + extra / 1e12, rel=1e-12)

    assert main(["--model", "tiny-sd3", "--stages", STAGES, "--cost-only", "--ip-adapter", inputs["ip-tiny-sd3"],
                 "--ip-adapter-image", inputs["photo"], "--ip-adapter-encoder", inputs["enc-tiny-sd3"],
                 "--output", str(tmp_path / "sd3")]) == 0
    rows = json.loads((tmp_path / "sd3" / "results.json").read_text())["variants"]
    counter = DiTCostCounter(FAMILIES["tiny-sd3"])
    ip = DiTIPAdapterCostCounter(FAMILIES["tiny-sd3"], inputs["ip-tiny-sd3"], inputs["enc-tiny-sd3"])
    extra = sum((ip.transformer(s.height, s.width, 2).flops - counter.transformer(s.height, s.width, 2).flops)
                * s.steps for s in _plan("tiny-sd3").stages)
    assert extra > 0 and rows[2]["true_tflop"] == pytest.approx(rows[1]["true_tflop"] + extra / 1e12, rel=1e-12)


def test_conditioned_cost_without_conditions_is_the_plain_one():
    for name in ("tiny-sd3", "tiny-flux"):
        counter, plan = DiTCostCounter(FAMILIES[name]), _plan(name)
        for cfg in (True, False):
            assert dit_conditioned_plan_cost(counter, plan, cfg) == dit_plan_cost(counter, plan, cfg)


@pytest.mark.gpu
def test_gpu_every_variant_with_its_controlnet_row(inputs, tmp_path, ran):
    """torch, graphs and compiled on CUDA, each with its conditioned row (ControlNet + image to image) on the
    variant's own networks, every segment timed, the rows against the measured peak."""
    assert main(["--model", "tiny-sd3", "--device", "cuda", "--stages", STAGES, "--repeats", "2", "--warmup", "1",
                 "--controlnet", inputs["cn-tiny-sd3"], "--control-image", inputs["edges"], "--image",
                 inputs["photo"], "--strength", "0.5", "--output", str(tmp_path)]) == 0
    data, rows = _rows(tmp_path)
    label = "controlnet cn-tiny-sd3 + image to image"
    assert [v["name"] for v in data["variants"]] == [
        "direct", "engine: torch", f"engine: torch + {label}", "direct (graphs)", "engine: graphs",
        f"engine: graphs + {label}", "direct (compiled)", "engine: compiled", f"engine: compiled + {label}"]
    for kind in ("torch", "graphs", "compiled"):
        cond, plain = rows[f"engine: {kind} + {label}"], rows[f"engine: {kind}"]
        assert cond["true_tflop"] == pytest.approx(rows[f"engine: torch + {label}"]["true_tflop"], rel=1e-12)
        assert cond["median_s"] > 0 and all(s["median_s"] is not None for s in cond["segments"])
        assert 0 < cond["fraction_of_peak"] < 1 and plain["steady_peak_gib"] is not None
    assert {r[0] for r in ran if r[2]} == {"ControlledFlowNetworks"}  # every conditioned generation controlled
    assert [s["over"] for s in data["speedups"] if s["engine"] == "engine: graphs"] == ["direct (graphs)"]


@pytest.mark.parametrize("name, cn", [("tiny-sd3", "cn-tiny-sd3"), ("tiny-flux", "cn-tiny-flux"),
                                      ("tiny-flux", "cn-xlabs")])
def test_counted_step_is_what_a_controlled_step_runs(inputs, name, cn):
    """The meta count of one step (transformer + ControlNet) equals FlopCounterMode around the runtime's own
    controlled velocity on real tensors: the same inputs (text tokens, CFG batch, packed FLUX tokens, an XLabs-kind
    net's pixels) are counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megafusion.benchmarks.flops import _extra_formulas
    from megafusion.core.loading import load_model
    from megafusion.engine.flow_networks import FlowTorchNetworks
    from megafusion.runtime.controlnet import Control
    from megafusion.runtime.flow_conditioning import encode_flow
    from megafusion.runtime.flow_controlnet import ControlledFlowNetworks, load_flow_controlnet

    bundle, plan = load_model(name), _plan(name)
    fam = bundle.family
    nets = FlowTorchNetworks(bundle)
    cond = encode_flow(nets, bundle, "a kite", "", fam.default_guidance, "cpu")
    module = load_flow_controlnet(inputs[cn], bundle.transformer, fam, "cpu", torch.float32)
    controlled = ControlledFlowNetworks(nets, [Control(module, torch.rand(1, 3, 64, 64))], "cpu")
    controlled.prepare_plan(plan)
    st = plan.stages[0]
    batch = 2 if cond.cfg else 1
    z = torch.randn(batch, fam.latent_channels, st.height // fam.vae_scale, st.width // fam.vae_scale)
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as ran:
        controlled.velocity(z, torch.full((batch,), 500.0), cond.states, cond.pooled, fam.default_guidance,
                            step=torch.tensor(0))
    counter = DiTCostCounter(fam)
    net = DiTControlNetCostCounter(counter, inputs[cn])
    counted = counter.transformer(st.height, st.width, batch).flops + net.step(st.height, st.width, batch).flops
    assert ran.get_total_flops() == counted
    # its control image: VAE-encoded per stage, except for a net that takes the pixels
    assert (net.control_image_encode(st.height, st.width).flops == 0) == (cn == "cn-xlabs")


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_counted_ip_adapter_step_is_what_the_adapted_step_runs(inputs, name):
    """The same for the IP-Adapter: the meta count of the adapted transformer against the runtime's IP-Adapter
    networks on real tensors (embeddings of the encoder's shape)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megafusion.benchmarks.dit_conditions import ip_image_embeds_shape
    from megafusion.benchmarks.flops import _extra_formulas
    from megafusion.core.loading import load_model
    from megafusion.engine.flow_networks import FlowTorchNetworks
    from megafusion.runtime.flow_conditioning import encode_flow

    bundle = load_model(name)
    fam = bundle.family
    if fam.kind == "sd3":
        from megafusion.runtime.flow_ipadapter_sd3 import (SD3IPAdapterNetworks as IPNets, load_sd3_ip_adapter,
                                                           read_sd3_ip_adapter as read)
        load = load_sd3_ip_adapter
    else:
        from megafusion.runtime.flow_ipadapter import (FlowIPAdapterNetworks as IPNets, load_flux_ip_adapter as load,
                                                       read_flux_ip_adapter as read)
    load(bundle.transformer, read(inputs[f"ip-{name}"], bundle.transformer), 0.7)
    embeds = torch.randn(1, *ip_image_embeds_shape(fam, inputs[f"enc-{name}"]))
    nets = IPNets(FlowTorchNetworks(bundle), embeds)
    cond = encode_flow(nets, bundle, "a kite", "", fam.default_guidance, "cpu")
    batch = 2 if cond.cfg else 1
    z = torch.randn(batch, fam.latent_channels, 128 // fam.vae_scale, 160 // fam.vae_scale)
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as ran:
        nets.velocity(z, torch.full((batch,), 500.0), cond.states, cond.pooled, fam.default_guidance)
    ip = DiTIPAdapterCostCounter(fam, inputs[f"ip-{name}"], inputs[f"enc-{name}"])
    assert ran.get_total_flops() == ip.transformer(128, 160, batch).flops
    assert ip.transformer(128, 160, batch).flops > DiTCostCounter(fam).transformer(128, 160, batch).flops
