"""LoRA with SD3 / FLUX transformer packages (engine/dit_engines.py, docs/ALGORITHM.md §18.2): the swap hands each
package exactly the weights `fuse_loras` leaves, under the packages' constant names; `mf-build-engines --lora`
builds from the fused weights. The CPU tests stand a recording object in for the AOTInductor package (a real
build takes minutes here); the GPU test builds and swaps real packages."""
from __future__ import annotations


import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.lora import LoraSpec, fuse_loras
from megafusion.engine.cache import EngineError, weights_fingerprint
from megafusion.engine.dit_engines import EngineTransformer, swap_dit_loras
from megafusion.engine.runners import ShapeDispatch
from megafusion.export.dit_aoti import dit_spec
from tests.core.test_dit_lora import _random_lora, save_diffusers


class _RecordingPackage:
    """Holds one constant per transformer parameter, named as the export wrapper names them; records loads."""

    def __init__(self, names, spec):
        self.names, self.loaded = list(names), []
        self.spec, self.capturable = spec, True
        self.model = self

    def get_constant_fqns(self):
        return self.names

    def load_constants(self, constants, check_full_update):
        assert check_full_update is False  # only the adapted weights are given
        self.loaded.append(constants)


def _engine(bundle, names):
    spec = dit_spec(bundle.family, "fp32")
    packages = [_RecordingPackage(names, spec) for _ in range(2)]  # two stage shapes
    dispatch = ShapeDispatch(tuple(((), p) for p in packages))
    return EngineTransformer(dispatch, bundle.family.kind, None, ("a.pt2", "b.pt2")), packages


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_swap_gives_every_package_the_fused_weights(model, tmp_path):
    bundle = load_model(model)
    path = save_diffusers(_random_lora(bundle), tmp_path / "l.safetensors", alpha=8.0)
    loras = [LoraSpec(path, 0.7)]
    names = [f"transformer.{n}" for n, _ in bundle.transformer.named_parameters()]
    engine, packages = _engine(bundle, names)
    base = weights_fingerprint(bundle.transformer)
    replaced = swap_dit_loras(engine, bundle, loras, "cpu", "REBUILD")
    assert weights_fingerprint(bundle.transformer) == base  # the swap leaves the module as it was
    fused = load_model(model)
    fuse_loras(fused, loras)
    want = {f"transformer.{n}": p for n, p in fused.transformer.named_parameters()
            if not torch.equal(p, bundle.transformer.get_parameter(n))}
    assert want and replaced == 2 * len(want)
    for package in packages:
        (constants,) = package.loaded
        assert constants.keys() == want.keys()
        for name, value in constants.items():
            assert value.dtype == torch.float32 and torch.equal(value, want[name]), name


def test_swap_into_a_package_without_the_constant_names_the_rebuild(tmp_path):
    bundle = load_model("tiny-sd3")
    path = save_diffusers(_random_lora(bundle), tmp_path / "l.safetensors")
    engine, packages = _engine(bundle, ["transformer.pos_embed.proj.weight"])  # the rest folded by Inductor
    with pytest.raises(EngineError, match="holds no constant for transformer.*build packages from the fused "
                                          "weights: REBUILD"):
        swap_dit_loras(engine, bundle, [LoraSpec(path)], "cpu", "REBUILD")
    assert not packages[0].loaded


def test_build_engines_lora_builds_from_the_fused_weights(tmp_path, monkeypatch, capsys):
    from megafusion.cli.build_engines import main as build

    path = save_diffusers(_random_lora(load_model("tiny-sd3")), tmp_path / "l.safetensors")
    seen = []

    def record(bundle, plan, precision, output, batch, device="cpu", force=False, log=None):
        seen.append(weights_fingerprint(bundle.transformer))
        return 0

    monkeypatch.setattr("megafusion.engine.dit_engines.build_dit_engines", record)
    argv = ["--model", "tiny-sd3", "--backend", "aoti", "--networks", "transformer", "--stages", "128x128:1",
            "--device", "cpu", "--output", str(tmp_path / "e")]
    assert build([*argv, "--lora", f"{path}:0.5"]) == 0
    assert f"lora: {path} x0.5" in capsys.readouterr().out
    fused = load_model("tiny-sd3")
    fuse_loras(fused, [LoraSpec(path, 0.5)])
    assert seen == [weights_fingerprint(fused.transformer)]
    assert seen[0] != weights_fingerprint(load_model("tiny-sd3").transformer)


def test_build_engines_refuses_a_unet_lora_before_the_load(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from megafusion.cli.build_engines import main as build

    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the bad LoRA was refused")

    monkeypatch.setattr("megafusion.core.loading.load_model", no_load)
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)},
              str(tmp_path / "u.safetensors"))
    assert build(["--model", "tiny-flux", "--backend", "aoti", "--networks", "transformer", "--device", "cpu",
                  "--output", str(tmp_path / "e"),
                  "--lora", str(tmp_path / "u.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'unet.down_blocks.0" in err, err


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_cuda_packages_take_the_lora_as_the_fused_build_does(name, tmp_path):
    """Base packages with the LoRA swapped in, and packages built from the fused weights, both give the torch run
    of the fused model (fp32 on CUDA)."""
    from megafusion.core.plan import Stage, validate_plan
    from megafusion.engine.dit_engines import build_dit_engines, engine_networks
    from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

    dev = "cuda"
    bundle = load_model(name, device=dev)
    fam = bundle.family
    plan = validate_plan(fam, [Stage(128, 128, 2), Stage(160, 192, 2)])
    opts = FlowGenerationOptions("a red fox", guidance=fam.default_guidance, seed=2, relay="latent")
    batch = 2 if fam.cfg and opts.guidance > 1 else 1
    loras = [LoraSpec(save_diffusers(_random_lora(bundle), tmp_path / "l.safetensors", 8.0), 0.7)]
    assert build_dit_engines(bundle, plan, "fp32", tmp_path / "base", batch, dev) == 2
    fused = load_model(name, device=dev)
    fuse_loras(fused, loras)
    want = FlowMegaFusionPipeline(fused).generate(plan, opts).latent
    plain = FlowMegaFusionPipeline(load_model(name, device=dev)).generate(plan, opts).latent

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    swapped = load_model(name, device=dev)
    nets = engine_networks(swapped, tmp_path / "base", dev, "fp32", loras=loras)
    assert rel(FlowMegaFusionPipeline(swapped, nets).generate(plan, opts).latent, want) < 1e-3
    assert rel(plain, want) > 1e-2
    assert build_dit_engines(fused, plan, "fp32", tmp_path / "fused", batch, dev) == 2
    other = load_model(name, device=dev)
    nets = engine_networks(other, tmp_path / "fused", dev, "fp32", loras=loras)
    assert rel(FlowMegaFusionPipeline(other, nets).generate(plan, opts).latent, want) < 1e-3
