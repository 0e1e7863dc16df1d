"""Static AOTInductor packages, the aoti default: one package (and one cache entry) per network and stage shape,
the shape in the key, each call dispatched to the package of its shape, shapes without a package refused naming
the sizes built and the command that builds the rest; `--dynamic` keeps one range package per network.

The build (session fixture, about a minute per package on 2 CPU cores) is a two-stage plan without dilation, so
one network (the UNet) has two packages; tolerance as the other engine tests (latents within 1e-3, fp32)."""
from __future__ import annotations

import pytest
import torch

from megafusion.cli.build_engines import main as build_main
from megafusion.core.families import get_family
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.core.specs import Requirement, ShapeProfile, plan_requirements
from megafusion.engine.aoti_backend import BACKEND as AOTI
from megafusion.engine.backend import get_backend
from megafusion.engine.cache import EngineCache
from megafusion.engine.load import CoverageError, open_engines
from megafusion.engine.runners import ShapeDispatch
from megafusion.runtime.pipeline import GenerationOptions

from tests.background import BUILDS
from tests.engines import assert_generation_matches_torch

PLAN = "128x128:3,256x256:2"


def _unet_req(plan_text: str, dilation: int = 2) -> tuple:
    fam = get_family("tiny-sd15")
    plan = validate_plan(fam, parse_stages(plan_text))
    return fam, plan, plan_requirements(fam, plan, "fp32", dilation)


def test_static_profiles_are_one_per_shape_with_stage_zero():
    fam, plan, reqs = _unet_req("128x128:3,192x192:1,256x256:2")
    dilated = next(r for r in reqs if r.spec.network == "unet" and r.spec.dilation == 2)
    assert [p.stage for p in dilated.profiles] == [1, 2]
    split = AOTI.requirements(fam, dilated, plan)
    assert len(split) == 2 and all(len(r.profiles) == 1 and r.profiles[0].stage == 0 for r in split)
    assert [r.profiles[0].shapes for r in split] == [p.shapes for p in dilated.profiles]
    for r in split:  # spatial axes static, the batch range kept
        for _, lo, _, hi in r.profiles[0].shapes:
            assert lo[1:] == hi[1:]
    sample = dict((n, (lo, hi)) for n, lo, _, hi in split[0].profiles[0].shapes)["sample"]
    assert sample == ((1, 4, 24, 24), (2, 4, 24, 24))
    (ranged,) = AOTI.requirements(fam, dilated, plan, dynamic=True)
    lo, hi = dict((n, (a, b)) for n, a, _, b in ranged.profiles[0].shapes)["sample"]
    assert lo[2:] == (16, 16) and hi[2:] == (32, 32)  # one package over the plan's range of sides


def test_a_shape_shared_by_two_plans_has_one_key():
    # The stage index is not in a static profile: a 256x256 package serves any plan that runs 256x256.
    fam, plan_a, reqs_a = _unet_req("128x128:3,256x256:2")
    _, plan_b, reqs_b = _unet_req("128x128:2,192x192:1,256x256:2")
    pick = lambda reqs, plan: {r.profiles[0].shapes: r.profiles[0] for req in reqs if req.spec.dilation == 2
                               for r in AOTI.requirements(fam, req, plan)}
    a, b = pick(reqs_a, plan_a), pick(reqs_b, plan_b)
    shared = set(a) & set(b)
    assert len(shared) == 1 and all(a[s] == b[s] for s in shared)


def test_dynamic_is_refused_for_backends_without_it(capsys, tmp_path):
    with pytest.raises(ValueError, match="--dynamic applies to the aoti backend only"):
        get_backend("onnxruntime").check_request("fp32", "none", "cpu", dynamic=True)
    assert build_main(["--model", "tiny-sd15", "--backend", "onnxruntime", "--dynamic", "--device", "cpu",
                       "--output", str(tmp_path / "e")]) == 2
    assert "--dynamic: --dynamic applies to the aoti backend only" in capsys.readouterr().err
    assert build_main(["--model", "tiny-sd15", "--backend", "aoti", "--jobs", "0", "--device", "cpu",
                       "--output", str(tmp_path / "e")]) == 2
    assert "--jobs 0: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


class _Fake:
    def __init__(self, spec, tag):
        self.spec, self.tag, self.capturable = spec, tag, True

    def run(self, inputs):
        return {"tag": self.tag}


def test_shape_dispatch_runs_the_engine_of_each_shape():
    fam, plan, reqs = _unet_req(PLAN, dilation=1)
    (unet,) = [r for r in reqs if r.spec.network == "unet"]
    small, large = unet.profiles
    d = ShapeDispatch((((small,), _Fake(unet.spec, "small")), ((large,), _Fake(unet.spec, "large"))))
    inputs = lambda side: {"sample": torch.zeros(2, 4, side, side), "timestep": torch.zeros(1),
                           "encoder_hidden_states": torch.zeros(2, 77, 32)}
    assert d.run(inputs(16))["tag"] == "small" and d.run(inputs(32))["tag"] == "large"
    with pytest.raises(ValueError, match=r"unet-standard-fp32: no engine takes the shapes .*\(2, 4, 24, 24\)"):
        d.run(inputs(24))


@pytest.fixture(scope="module")
def static_engines():
    """The static packages of PLAN, no dilation (tests/conftest.py builds them beside the tests)."""
    BUILDS.get("aoti_static")
    return BUILDS.folder("aoti-static")


@pytest.mark.slow
def test_static_packages_one_entry_per_shape(static_engines):
    entries = list(EngineCache(static_engines).entries().values())
    unets = sorted((e for e in entries if e.key.network == "unet"), key=lambda e: e.key.profiles[0].shapes)
    assert len(unets) == 2 and unets[0].digest != unets[1].digest
    assert [e.key.profiles[0].shapes[0][3][2:] for e in unets] == [(16, 16), (32, 32)]  # the shape is the key's
    assert len([e for e in entries if e.key.network == "vae_decoder"]) == 2
    assert all(len(e.files) == 1 and e.files[0].path.endswith("model.pt2") for e in entries)


@pytest.mark.slow
def test_generation_from_static_packages_matches_torch(tiny_sd15, static_engines):
    plan = validate_plan(tiny_sd15.family, parse_stages(PLAN))
    nets, desc = open_engines(static_engines, tiny_sd15, plan, dilation=1, relay="latent")
    assert desc.startswith("aoti") and isinstance(nets.runners[("unet", 1)], ShapeDispatch)
    assert nets.capturable
    opts = GenerationOptions("a red cube", negative_prompt="blurry", seed=3, relay="latent", dilation=1)
    assert_generation_matches_torch(tiny_sd15, nets, plan, opts)


@pytest.mark.slow
def test_a_size_without_package_names_the_sizes_built_and_the_command(tiny_sd15, static_engines):
    plan = validate_plan(tiny_sd15.family, parse_stages("128x128:3,192x192:2"))
    with pytest.raises(CoverageError, match=r"do not cover unet \(standard, fp32\) at 192x192; they cover "
                                            r"128x128, 256x256\. Build them with: mf-build-engines .*"
                                            r"--stages 128x128:3,192x192:2 --backend aoti"):
        open_engines(static_engines, tiny_sd15, plan, dilation=1, relay="latent")
