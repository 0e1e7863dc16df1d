"""SD3 / FLUX text encoder and VAE packages (engine/flow_aux_engines.py, export/flow_aux_aoti.py): the requirements a
plan makes, and the packages give the torch modules' outputs as FlowTorchNetworks computes them (float32, CPU)."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, parse_stages, validate_plan
from megafusion.engine.cache import EngineCache, EngineError
from megafusion.engine.flow_aux_engines import FlowAuxPackages, build_flow_aux_engines, flow_aux_requirements
from megafusion.engine.flow_networks import FlowTorchNetworks


def _relerr(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_requirements_follow_the_relay():
    fam = load_model("tiny-sd3").family
    plan = validate_plan(fam, [Stage(128, 128, 2), Stage(128, 128, 1), Stage(192, 160, 2)])
    reqs = flow_aux_requirements(fam, plan, "fp32")
    got = [(r.spec.network, r.profile.shapes[0][1]) for r in reqs]
    assert got == [("text_encoder", (1, 77)), ("text_encoder_2", (1, 77)), ("text_encoder_3", (1, 256)),
                   ("vae_decoder", (1, 16, 16, 16)), ("vae_decoder", (1, 16, 24, 20)),
                   ("vae_encoder", (1, 3, 128, 128)), ("vae_encoder", (1, 3, 192, 160))]
    latent = [(r.spec.network, r.profile.shapes[0][1]) for r in flow_aux_requirements(fam, plan, "fp32", "latent")]
    assert latent[3:] == [("vae_decoder", (1, 16, 24, 20))]
    flux = flow_aux_requirements(load_model("tiny-flux").family, plan, "fp32")
    assert [r.spec.network for r in flux[:2]] == ["text_encoder", "text_encoder_2"]
    assert flux[1].profile.shapes[0][1] == (1, 512) and [t.name for t in flux[0].spec.outputs] == ["hidden_states",
                                                                                                   "pooled"]


@pytest.mark.slow
def test_packages_equal_the_modules(tmp_path, flux_aoti):
    # The session's tiny-flux folder (tests/conftest.py flux_aoti: mf-build-engines builds every network), copied.
    from tests.conftest import FLUX_AOTI_STAGES

    bundle = load_model("tiny-flux")
    fam = bundle.family
    plan = validate_plan(fam, parse_stages(FLUX_AOTI_STAGES))
    built, said = flux_aoti
    shutil.copytree(built, tmp_path, dirs_exist_ok=True)
    n = len(flow_aux_requirements(fam, plan, "fp32"))
    assert n == 5 and re.search(r"^text encoder and VAE packages: 5 built$", said, re.M), said
    assert build_flow_aux_engines(bundle, plan, "fp32", tmp_path) == 0  # present and valid: kept
    assert sum(e.key.network != "transformer" for e in EngineCache(tmp_path).entries().values()) == n
    pk, nets = FlowAuxPackages(tmp_path, bundle, "cpu", "fp32"), FlowTorchNetworks(bundle)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 400, (1, 77), generator=g, dtype=torch.int32)
    hidden, pooled = pk.run("text_encoder", ids)
    ref_h, ref_p = nets.clip(0, ids.long())
    assert _relerr(hidden, ref_h) < 1e-5 and _relerr(pooled, ref_p) < 1e-5
    t5_ids = torch.randint(0, 100, (1, 512), generator=g, dtype=torch.int32)
    assert _relerr(pk.run("text_encoder_2", t5_ids)[0], nets.t5(t5_ids.long())) < 1e-5
    lat = torch.randn(1, 16, 20, 20, generator=g)
    assert _relerr(pk.run("vae_decoder", lat)[0], nets.vae_decode(lat)) < 1e-4
    img = torch.rand(1, 3, 160, 160, generator=g) * 2 - 1
    assert _relerr(pk.run("vae_encoder", img)[0], nets.vae_encode(img)) < 1e-4
    with pytest.raises(EngineError, match=r"vae_decoder package for input shape \(1, 16, 32, 32\)"):
        pk.run("vae_decoder", torch.zeros(1, 16, 32, 32))


@pytest.mark.parametrize("flags,message", [
    (["--networks", "unet"], "--networks 'unet': tiny-sd3 builds transformer, text_encoders, vae"),
    (["--networks", "vae", "--backend", "onnxruntime"], "onnxruntime builds the tiny-sd3 transformer only"),
])
def test_networks_of_the_transformer_families_are_checked(flags, message, tmp_path, capsys):
    from megafusion.cli.build_engines import main as build

    assert build(["--model", "tiny-sd3", "--backend", "aoti", *flags, "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
