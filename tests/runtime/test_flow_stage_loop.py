"""The flow stage loop (docs/ALGORITHM.md §18) on a network that knows the clean latent.

The fake transformer returns v = (z - X) / sigma, with sigma = timestep / 1000 and X the clean latent at the
stage's size; then x0 = z - sigma v = X at every step, whatever the noise. A plan that truncates, relays on the
latent and re-noises must end exactly on X at the last stage's size: a wrong sigma in the update, the
truncation, the re-noise or the timestep would leave noise in it.
"""
from __future__ import annotations

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks, pack, unpack
from megafusion.runtime.flow_pipeline import (FlowGenerationOptions, FlowMegaFusionPipeline, flow_relay,
                                              guided_velocity)
from megafusion.runtime.flow_conditioning import FlowConditioning
from megafusion.runtime.relay import bicubic_resize

X = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def clean(h: int, w: int) -> torch.Tensor:
    return bicubic_resize(X, h, w)


class KnowsX0(FlowTorchNetworks):
    def __init__(self, bundle):
        super().__init__(bundle)
        self.timesteps = []

    def velocity(self, z, timestep, states, pooled, guidance):
        self.timesteps.append(float(timestep[0]))
        return (z - clean(*z.shape[-2:])) / (timestep[0] / 1000)


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def bundle(request):
    return load_model(request.param)


def test_truncate_relay_renoise_end_on_the_clean_latent(bundle):
    plan = validate_plan(bundle.family, [Stage(128, 128, 3), Stage(160, 192, 2), Stage(256, 256, 2)])
    nets = KnowsX0(bundle)
    for g in (1.0, 3.0):  # with and without SD3's CFG batch
        res = FlowMegaFusionPipeline(bundle, nets).generate(plan, FlowGenerationOptions("x", guidance=g,
                                                                                        relay="latent"))
        torch.testing.assert_close(res.latent, clean(32, 32), atol=1e-5, rtol=1e-5)
        assert res.image.shape == (256, 256, 3)
    assert len(nets.timesteps) == 2 * plan.total_steps and nets.timesteps[0] == pytest.approx(1000, rel=1e-6)


def test_pixel_relay_uses_the_vae_shift_and_scaling(bundle):
    vae, nets = bundle.vae, FlowTorchNetworks(bundle)
    sc, sh = vae.config.scaling_factor, vae.config.shift_factor
    x0 = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = vae.decode(x0 / sc + sh).sample.clamp(-1, 1)
        image = torch.nn.functional.interpolate(image, size=(160, 192), mode="bicubic").clamp(-1, 1)
        ref = (vae.encode(image).latent_dist.mean - sh) * sc
    torch.testing.assert_close(flow_relay(nets, x0, 160, 192, sc, sh, 8, "pixel"), ref, atol=1e-5, rtol=1e-5)


def test_cfg_combines_the_batch():
    class Fixed:
        def velocity(self, z, t, states, pooled, g):
            return torch.cat([torch.full_like(z[:1], 1.0), torch.full_like(z[:1], 3.0)])

    cond = FlowConditioning(torch.zeros(2, 4, 8), torch.zeros(2, 8), True)
    v = guided_velocity(Fixed(), torch.zeros(1, 16, 4, 4), torch.tensor(500.0), cond, 7.0)
    assert torch.all(v == 1.0 + 7.0 * (3.0 - 1.0))


def test_pack_unpack_round_trip():
    z = torch.randn(2, 16, 6, 10)
    assert pack(z).shape == (2, 15, 64)
    assert torch.equal(unpack(pack(z), 6, 10), z)
