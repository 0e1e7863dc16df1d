"""`BuildRequest.release_weights` (what `mf-build-engines` sets): the bundle is cast in place and freed as the
build goes, yet the entries' keys are those of the weights as loaded, so `open_engines` on a freshly loaded
bundle accepts them."""
from __future__ import annotations

import torch

from megafusion.engine.cache import EngineCache
from megafusion.engine.fingerprint import network_fingerprint
from megafusion.engine.load import open_engines
from megafusion.engine.networks import TorchNetworks
from megafusion.core.loading import load_model
from megafusion.core.plan import parse_stages, validate_plan

from tests.engines import STAGES, build


def test_release_weights_frees_the_bundle_and_keeps_the_keys(tmp_path):
    bundle = load_model("tiny-sd15")  # private: the build empties it
    fresh = load_model("tiny-sd15")
    report = build(bundle, tmp_path, precision="fp16", release_weights=True)
    assert len(report.built) == 5
    for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
        assert all(t.device.type == "meta" for t in (*m.parameters(), *m.buffers()))  # freed
    want = {n: network_fingerprint(fresh, n) for n in ("unet", "vae_decoder", "vae_encoder", "text_encoder")}
    got = {e.key.network: e.key.weights for e in EngineCache(tmp_path).entries().values()}
    assert got == want  # hashed before the in-place fp16 cast
    plan = validate_plan(fresh.family, parse_stages(STAGES))
    networks, _ = open_engines(tmp_path, fresh, plan, precision="fp16")  # not refused as stale
    assert fresh.unet.dtype == torch.float32
    # The engines compute the fresh model's function: exported from the loaded weights, not freed or
    # half-cast ones (fp16 engines against fp32 modules: 1e-2 relative L2).
    g = torch.Generator().manual_seed(4)
    z, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    ref = TorchNetworks(fresh)
    for got, want in ((networks.unet(z, torch.tensor(501), ehs, None, None, 1), ref.unet(z, torch.tensor(501), ehs,
                                                                                          None, None, 1)),
                      (networks.vae_decode(z[:1]), ref.vae_decode(z[:1]))):
        assert want.abs().max() > 1e-3
        assert float((got - want).norm() / want.norm()) < 1e-2
