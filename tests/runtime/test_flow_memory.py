"""The transformer families' memory estimate (runtime/flow_memory.py): the meta-device count equals the live tensor
bytes of the same calls run for real on CPU, the peak is weights plus the largest segment, and the segments follow
the plan (CFG batch, relay, graph pool)."""
from __future__ import annotations

import pytest
import torch

from megafusion.core.families import get_family
from megafusion.core.loading import load_model
from megafusion.core.memory import LiveBytes
from megafusion.core.plan import Stage, default_plan, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.runtime.flow_memory import estimate_flow_memory, meta_networks


def _measured(fn) -> int:
    counter = LiveBytes()
    with torch.inference_mode(), counter:
        fn()
    return counter.peak


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def bundle(request):
    return load_model(request.param)


def test_estimate_equals_live_bytes_of_a_real_cpu_run(bundle):
    fam = bundle.family
    plan = validate_plan(fam, [Stage(128, 128, 2), Stage(256, 192, 2)])
    est = estimate_flow_memory(fam, plan, torch.float32)
    segments = dict(est.segments)
    nets = FlowTorchNetworks(bundle)
    batch = 2 if fam.cfg else 1
    text = bundle.transformer.config.joint_attention_dim
    tokens = 77 + fam.t5_max_length if fam.kind == "sd3" else fam.t5_max_length
    z, t = torch.randn(batch, fam.latent_channels, 32, 24), torch.full([batch], 500.0)
    states = torch.randn(batch, tokens, text)
    pooled = torch.randn(batch, bundle.transformer.config.pooled_projection_dim)
    real = _measured(lambda: nets.velocity(z, t, states, pooled, 3.5))
    meta = segments[f"stage 2 transformer 192x256, batch {batch}"]
    assert real > 0 and abs(meta - real) <= 0.05 * real, (meta, real)
    lat = torch.randn(1, fam.latent_channels, 32, 24)
    real = _measured(lambda: nets.vae_decode(lat))
    assert abs(segments["final decode 192x256"] - real) <= 0.05 * real
    img = torch.rand(1, 3, 256, 192) * 2 - 1
    real = _measured(lambda: nets.vae_encode(img))
    assert abs(segments["relay 1->2 encode 192x256"] - real) <= 0.05 * real
    # every module's parameters and buffers, as loaded
    assert est.weights_bytes == sum(p.numel() * p.element_size() for m in bundle.modules()
                                    for p in (*m.parameters(), *m.buffers()))


def test_segments_follow_the_plan_and_the_peak_is_weights_plus_the_largest():
    sd3 = get_family("sd3")
    plan = default_plan(sd3)
    est = estimate_flow_memory(sd3, plan, torch.bfloat16)
    assert [n for n, _ in est.segments] == [
        "text encoders", "stage 1 transformer 1024x1024, batch 2", "relay 1->2 decode 1024x1024",
        "relay 1->2 encode 2048x2048", "stage 2 transformer 2048x2048, batch 2", "final decode 2048x2048"]
    assert est.peak_bytes == est.weights_bytes + max(b for _, b in est.segments)
    # SD3 Medium's layout in bf16: transformer 2.0 B, T5-XXL 4.8 B, CLIP-L and -G 0.8 B, VAE 0.08 B parameters
    assert 14.0 < est.weights_bytes / 2**30 < 14.8
    no_cfg = estimate_flow_memory(sd3, plan, torch.bfloat16, cfg=False, relay="latent")
    assert [n for n, _ in no_cfg.segments] == ["text encoders", "stage 1 transformer 1024x1024, batch 1",
                                               "stage 2 transformer 2048x2048, batch 1", "final decode 2048x2048"]
    flux = get_family("flux")
    assert "batch 1" in estimate_flow_memory(flux, default_plan(flux), torch.bfloat16).segments[1][0]  # no CFG batch


def test_one_meta_model_serves_several_estimates():
    fam = get_family("tiny-flux")
    shared = meta_networks(fam, torch.float32)  # as mf-serve estimates every served size with one
    plans = validate_plan(fam, [Stage(128, 128, 1), Stage(256, 256, 1)]), validate_plan(fam, [Stage(160, 160, 2)])
    for plan in plans:  # FLUX's position ids, cached per size, are counted as a fresh run makes them
        for relay in ("pixel", "latent"):
            assert (estimate_flow_memory(fam, plan, torch.float32, relay=relay, networks=shared)
                    == estimate_flow_memory(fam, plan, torch.float32, relay=relay))


def test_graph_pool_is_held_under_the_later_segments():
    fam = get_family("tiny-sd3")
    plan = validate_plan(fam, [Stage(128, 128, 1), Stage(256, 256, 1)])
    plain = estimate_flow_memory(fam, plan, torch.float32)
    graphed = estimate_flow_memory(fam, plan, torch.float32, graph_pool=True)
    stage1 = dict(plain.segments)["stage 1 transformer 128x128, batch 2"]
    names = [n for n, _ in graphed.segments]
    assert graphed.held[names.index("relay 1->2 decode 128x128")] == stage1
    assert graphed.held[names.index("stage 1 transformer 128x128, batch 2")] == 0
    assert graphed.peak_bytes >= plain.peak_bytes
