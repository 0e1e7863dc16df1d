"""The memory estimate (core/memory.py): the meta-device count equals the live tensor bytes of a real run of
the same networks on CPU, the peak is weights plus the largest segment, and the segments follow the plan."""
from __future__ import annotations

import torch

from megafusion.core.families import SDXL
from megafusion.core.memory import LiveBytes, estimate_memory
from megafusion.core.plan import Stage, default_plan, validate_plan


def _measured(fn) -> int:
    counter = LiveBytes()
    with torch.inference_mode(), counter:
        fn()
    return counter.peak


def test_estimate_equals_live_bytes_of_a_real_cpu_run(tiny_sdxl):
    plan = validate_plan(tiny_sdxl.family, [Stage(128, 128, 2), Stage(256, 192, 2)])
    est = dict(estimate_memory(tiny_sdxl.family, plan, torch.float32, torch.float32).segments)
    unet, vae = tiny_sdxl.unet, tiny_sdxl.vae
    x, ehs = torch.randn(2, 4, 32, 24), torch.randn(2, 77, 64)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    real = _measured(lambda: unet(x, torch.tensor(999), encoder_hidden_states=ehs, added_cond_kwargs=added))
    meta = est["stage 2 UNet 192x256, batch 2"]
    assert real > 0 and abs(meta - real) <= 0.05 * real, (meta, real)
    lat = torch.randn(1, 4, 32, 24)
    real = _measured(lambda: vae.decode(lat))
    assert abs(est["final decode 192x256"] - real) <= 0.05 * real


def test_peak_is_weights_plus_the_largest_segment_and_segments_follow_the_plan():
    plan = default_plan(SDXL)
    pixel = estimate_memory(SDXL, plan, torch.float16, torch.float32)
    names = [n for n, _ in pixel.segments]
    assert names == ["stage 1 UNet 1024x1024, batch 2", "relay 1->2 decode 1024x1024", "relay 1->2 encode 2048x2048",
                     "stage 2 UNet 2048x2048, batch 2", "final decode 2048x2048"]
    assert pixel.peak_bytes == pixel.weights_bytes + max(b for _, b in pixel.segments)
    # SDXL fp16 UNet (2.57 B parameters), fp32 VAE, fp16 text encoders: about 6.6 GiB of weights
    assert 6.3 < pixel.weights_bytes / 2**30 < 6.9
    latent = estimate_memory(SDXL, plan, torch.float16, torch.bfloat16, relay="latent", cfg=False)
    assert [n for n, _ in latent.segments] == ["stage 1 UNet 1024x1024, batch 1", "stage 2 UNet 2048x2048, batch 1",
                                               "final decode 2048x2048"]
    assert latent.peak_bytes < pixel.peak_bytes  # a 16-bit VAE halves the decode


def test_tiled_vae_estimate_equals_live_bytes_of_a_real_tiled_run(tiny_sdxl):
    """The meta-device count of a tiled pass (runtime/vae_tiling.py) against the same pass run on CPU."""
    from megafusion.core.memory import VaePasses
    from megafusion.runtime.memory_plan import tiled_passes
    from megafusion.runtime.vae_tiling import VaeTiling, tiled_decode, tiled_encode

    plan = validate_plan(tiny_sdxl.family, [Stage(128, 128, 1), Stage(256, 384, 1)])
    passes = tiled_passes(VaeTiling(128))
    est = dict(estimate_memory(tiny_sdxl.family, plan, torch.float32, torch.float32, vae_passes=passes).segments)
    lat = torch.randn(1, 4, 32, 48)
    real = _measured(lambda: tiled_decode(tiny_sdxl.vae, lat, 128))
    meta = est["final decode 384x256 (tiled 128)"]
    assert real > 0 and abs(meta - real) <= 0.05 * real, (meta, real)
    img = torch.rand(1, 3, 256, 384) * 2 - 1
    real = _measured(lambda: tiled_encode(tiny_sdxl.vae, img, 128))
    assert abs(est["relay 1->2 encode 384x256 (tiled 128)"] - real) <= 0.05 * real
    assert "relay 1->2 decode 128x128" in est  # one tile: untiled, unlabelled
    assert isinstance(passes, VaePasses)


def test_graph_pool_is_held_under_every_later_vae_pass():
    plan = default_plan(SDXL)
    est = estimate_memory(SDXL, plan, torch.float16, torch.bfloat16, graph_pool=True)
    seg = dict(est.segments)
    unet1, unet2 = seg["stage 1 UNet 1024x1024, batch 2"], seg["stage 2 UNet 2048x2048, batch 2"]
    assert est.held == (0, unet1, unet1, 0, unet2)  # the decode after stage 2 runs beside stage 2's pool
    assert est.peak_bytes == est.weights_bytes + unet2 + seg["final decode 2048x2048"]
    assert [p for _, p in est.stage_peaks()][-1] == est.peak_bytes
    assert "CUDA-graph pool" in est.describe()[0]
