"""mf-bench --ip-adapter for the UNet families (benchmarks/conditions.py): the conditioned row runs the IP-Adapter on
a copy of the UNet (the plain rows keep the base one), its cost is the plain plan's with the adapted UNet's steps
(`IPAdapterCostCounter`), and the engines variants refuse it. tiny-sd15 on CPU; never the speed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megafusion.benchmarks.conditions import IPAdapterCostCounter
from megafusion.benchmarks.flops import MetaCostCounter
from megafusion.cli.bench import main
from megafusion.core.families import FAMILIES
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.runtime.pipeline import MegaFusionPipeline
from tests.cli.refusals import refused

STAGES = "128x128:1,192x192:1"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from megafusion.core.loading import load_model
    from tests.runtime.test_ipadapter import save_ip_adapter, save_tiny_image_encoder, tiny_ip_adapter

    d = tmp_path_factory.mktemp("ip-bench")
    ip = save_ip_adapter(tiny_ip_adapter(load_model("tiny-sd15").unet), d / "ip.safetensors")
    enc = save_tiny_image_encoder(d / "enc")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(d / "ref.png")
    return {"ip": str(ip), "enc": str(enc), "ref": str(d / "ref.png")}


def _ip(inputs):
    return ["--ip-adapter", inputs["ip"], "--ip-adapter-image", inputs["ref"], "--ip-adapter-encoder", inputs["enc"],
            "--ip-adapter-scale", "0.6"]


@pytest.mark.slow  # 20-30 s here: the diffusers eager row and direct run beside it
def test_ip_adapter_row_on_a_copy_of_the_unet(inputs, tmp_path, monkeypatch):
    seen = []
    original = MegaFusionPipeline.generate

    def recording(self, plan, opts, *a, **k):
        seen.append((type(self.nets).__name__, self.bundle.unet))
        return original(self, plan, opts, *a, **k)

    monkeypatch.setattr(MegaFusionPipeline, "generate", recording)
    assert main(["--model", "tiny-sd15", "--device", "cpu", "--stages", STAGES, "--repeats", "1", "--warmup", "0",
                 *_ip(inputs), "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {v["name"]: v for v in data["variants"]}
    cond, plain = rows["engine: torch + ip-adapter ip x0.6"], rows["engine: torch"]
    assert cond["role"] == "conditioned" and cond["pair"] == "engine: torch" and cond["setup_s"] is None
    # direct and plain on the base UNet; the conditioned row on the adapted copy
    (_, direct_unet), (_, plain_unet), (kind, copy) = seen  # the eager baseline runs no MegaFusionPipeline
    assert direct_unet is plain_unet and copy is not plain_unet and kind == "IPAdapterNetworks"
    assert not any(hasattr(p, "to_k_ip") for p in plain_unet.attn_processors.values())
    fam = FAMILIES["tiny-sd15"]
    plan = validate_plan(fam, parse_stages(STAGES))
    counter, ip = MetaCostCounter(fam), IPAdapterCostCounter(fam, inputs["ip"], inputs["enc"])
    extra = sum((ip.unet(s.height, s.width, 2, 1 if k == 0 else 2).flops
                 - counter.unet(s.height, s.width, 2, 1 if k == 0 else 2).flops) * s.steps
                for k, s in enumerate(plan.stages))
    assert extra > 0 and cond["true_tflop"] == pytest.approx(plain["true_tflop"] + extra / 1e12, rel=1e-12)
    assert data["settings"]["conditions"]["ip_adapter"] == {"path": inputs["ip"], "encoder": inputs["enc"],
                                                           "scale": 0.6}


def test_cost_only_and_refusals(inputs, tmp_path, capsys):
    assert main(["--model", "tiny-sd15", "--stages", STAGES, "--cost-only", *_ip(inputs),
                 "--output", str(tmp_path / "c")]) == 0
    rows = json.loads((tmp_path / "c" / "results.json").read_text())["variants"]
    assert [v["name"] for v in rows] == ["direct", "MegaFusion", "MegaFusion + ip-adapter ip x0.6"]
    assert rows[2]["true_tflop"] > rows[1]["true_tflop"]
    refused("mf-bench", ["--model", "tiny-sd15", "--device", "cpu", "--variants", "engines:onnxruntime",
                         "--engine-dir", str(tmp_path), *_ip(inputs), "--output", str(tmp_path / "o")], capsys,
            "--ip-adapter with --variants engines:onnxruntime: the IP-Adapter runs on the torch variants only")
    refused("mf-bench", ["--model", "tiny-sdxl", "--stages", "128x128:1", "--cost-only", *_ip(inputs),
                         "--output", str(tmp_path / "o")], capsys, "--ip-adapter", "does not give 4 tokens")
    refused("mf-bench", ["--model", "tiny-if", "--output", str(tmp_path / "o"), *_ip(inputs)], capsys,
            "--ip-adapter: mf-bench takes the extra conditions for the latent families")
    assert not (tmp_path / "o").exists()


def test_counted_step_is_what_the_adapted_unet_runs(inputs):
    """The meta count of one adapted UNet step (dilated, CFG batch 2) equals FlopCounterMode around the runtime's
    IPAdapterNetworks on real tensors."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megafusion.benchmarks.flops import _extra_formulas
    from megafusion.core.loading import load_model
    from megafusion.engine.networks import TorchNetworks
    from megafusion.runtime.ipadapter import IPAdapterNetworks, load_ip_adapter, read_ip_adapter

    bundle = load_model("tiny-sd15")
    load_ip_adapter(bundle.unet, read_ip_adapter(inputs["ip"], bundle.unet), 0.6)
    nets = IPAdapterNetworks(TorchNetworks(bundle), torch.randn(1, 1, 24))  # the tiny encoder's projection width
    fam = bundle.family
    sample = torch.randn(2, 4, 192 // fam.vae_scale, 128 // fam.vae_scale)
    states = torch.randn(2, 77, fam.unet["cross_attention_dim"])
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as ran:
        nets.unet(sample, torch.tensor(981), states, None, None, 2)
    ip = IPAdapterCostCounter(fam, inputs["ip"], inputs["enc"])
    assert ran.get_total_flops() == ip.unet(192, 128, 2, 2).flops > MetaCostCounter(fam).unet(192, 128, 2, 2).flops
