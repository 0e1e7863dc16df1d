"""LoRA weights swapped into built engines without recompiling (engine/lora_swap.py): AOTInductor packages and
ONNX Runtime sessions built from the base weights, after a swap, equal the torch modules with the LoRA fused (and
a package built from the fused model); a swap to no LoRA or to scale 0 gives back the base output exactly; the
networks carry the swapped fingerprint; backends that cannot swap, engines that cannot take a weight and bad LoRA
files are refused with one line.

Every bundle here is a fresh `load_model` (the session's `tiny_sd15` may have been prepared for AOTInductor by other
tests: fused QKV beside the unfused projections, which a LoRA on the torch side would not reach). Tolerance: 1e-5
relative on the network outputs (fp32 on CPU; measured below 1e-6)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.cli.generate import main as generate_main
from megafusion.core.loading import load_model
from megafusion.core.lora import LoraSpec, fuse_loras
from megafusion.core.plan import parse_stages, validate_plan
from megafusion.core.specs import network_spec
from megafusion.engine.backend import OpenContext, WeightSwapError, get_backend
from megafusion.engine.build import BuildRequest, build_engines
from megafusion.engine.cache import EngineCache
from megafusion.engine.load import open_engines, open_entry
from megafusion.engine.lora_swap import LoraSwap, SwapRefused, engines_of
from megafusion.engine.runners import EngineNetworks
from megafusion.engine.torch_backend import ModuleRunner

from tests.conftest import AOTI_STAGES
from tests.core.test_lora import _random_lora, save_diffusers, save_kohya

REL_TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A diffusers-format LoRA on the UNet's and the text encoder's attention projections."""
    return save_diffusers(_random_lora(load_model("tiny-sd15")), tmp_path_factory.mktemp("lora") / "style.safetensors")


def _inputs(bundle, side: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(side)
    dim = bundle.unet.config.cross_attention_dim
    x = {"sample": torch.randn(2, 4, side, side, generator=g), "timestep": torch.tensor([10.0]),
         "encoder_hidden_states": torch.randn(2, 77, dim, generator=g)}
    return {k: v.to(device) for k, v in x.items()}


def _ids(device: str = "cpu") -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (1, 77), generator=torch.Generator().manual_seed(0)).int().to(device)}


def _outputs(nets: EngineNetworks, bundle) -> dict[str, torch.Tensor]:
    """UNet at 128 px (standard) and 256 px (dilated), text encoder: the networks the LoRA changes."""
    dev = nets.device.type
    return {"unet": nets.runners[("unet", 1)].run(_inputs(bundle, 16, dev))["eps"].cpu(),
            "unet-dilated": nets.runners[("unet", 2)].run(_inputs(bundle, 32, dev))["eps"].cpu(),
            "text_encoder": nets.runners[("text_encoder", 1)].run(_ids(dev))["hidden_states"].cpu()}


def _torch_outputs(bundle, device: str = "cpu") -> dict[str, torch.Tensor]:
    fam, dev = bundle.family, torch.device(device)
    unet = lambda d: ModuleRunner(bundle.unet, network_spec(fam, "unet", "fp32", d), False, dev)
    te = ModuleRunner(bundle.text_encoders[0], network_spec(fam, "text_encoder", "fp32", 1), False, dev)
    return {"unet": unet(1).run(_inputs(bundle, 16, device))["eps"].cpu(),
            "unet-dilated": unet(2).run(_inputs(bundle, 32, device))["eps"].cpu(),
            "text_encoder": te.run(_ids(device))["hidden_states"].cpu()}


def _open_all(folder: Path, bundle, device: str = "cpu") -> EngineNetworks:
    """Every entry of a folder (one per network and dilation), marked with its entry's weights."""
    entries = list(EngineCache(folder).entries().values())
    backend = get_backend(entries[0].key.backend)
    ctx = OpenContext(bundle.family, torch.device(device), bundle)
    nets = EngineNetworks({(e.key.network, e.key.dilation): open_entry(folder, e, backend, ctx) for e in entries},
                          torch.device(device), backend.name)
    nets.weights = {e.key.network: e.key.weights for e in entries}
    return nets


def _check_swaps(nets: EngineNetworks, base, lora_file: Path, tol: float = REL_TOL) -> None:
    """Swap in, compare with the fused torch modules, swap out (to none, to scale 0): the base output exactly."""
    before, base_weights = _outputs(nets, base), dict(nets.weights)
    swap = LoraSwap(nets, base, "REBUILD")
    report = swap.swap([LoraSpec(lora_file, 0.7)])
    fused = load_model("tiny-sd15")
    fuse_loras(fused, [LoraSpec(lora_file, 0.7)])
    got, want = _outputs(nets, base), _torch_outputs(fused, nets.device.type)
    for name in want:
        assert _rel(got[name], want[name]) <= tol, name
        assert _rel(before[name], want[name]) > 1e-2, name  # the LoRA changes what is compared
    assert report.engines >= 3 and report.tensors > 0
    assert nets.weights["unet"] != base_weights["unet"] and nets.weights["text_encoder"] != base_weights["text_encoder"]
    assert all(nets.weights[n] == w for n, w in base_weights.items() if n not in ("unet", "text_encoder"))
    other = swap.swap([LoraSpec(lora_file, 0.3)]).weights["unet"]
    assert other not in (base_weights["unet"], report.weights["unet"])  # the scale is in the fingerprint
    swap.swap([])
    assert nets.weights == base_weights
    assert all(torch.equal(a, before[n]) for n, a in _outputs(nets, base).items())
    swap.swap([LoraSpec(lora_file, 0.0)])
    assert all(torch.equal(a, before[n]) for n, a in _outputs(nets, base).items())


@pytest.mark.slow
def test_aoti_packages_take_the_lora(sd15_aoti, lora_file, one_thread):
    base = load_model("tiny-sd15")
    plan = validate_plan(base.family, parse_stages(AOTI_STAGES))
    nets, _ = open_engines(sd15_aoti, base, plan, backend="aoti")
    _check_swaps(nets, base, lora_file)


@pytest.mark.slow
def test_swapped_package_equals_one_built_from_the_fused_model(sd15_aoti, lora_file, tmp_path, one_thread):
    fused = load_model("tiny-sd15")
    fuse_loras(fused, [LoraSpec(lora_file, 0.7)])
    plan = validate_plan(fused.family, parse_stages(AOTI_STAGES))
    build_engines(fused, BuildRequest(plan, "aoti", "fp32", tmp_path, dynamic=True, networks=("unet-standard",)))
    (entry,) = EngineCache(tmp_path).entries().values()
    built = open_entry(tmp_path, entry, get_backend("aoti"), OpenContext(fused.family, torch.device("cpu")))
    base = load_model("tiny-sd15")
    nets, _ = open_engines(sd15_aoti, base, plan, backend="aoti")
    LoraSwap(nets, base, "REBUILD").swap([LoraSpec(lora_file, 0.7)])
    x = _inputs(base, 16)
    got, want = nets.runners[("unet", 1)].run(x)["eps"], built.run(x)["eps"]
    assert _rel(got, want) <= REL_TOL


@pytest.mark.gpu
def test_aoti_packages_take_the_lora_on_cuda(lora_file, tmp_path, monkeypatch):
    """Static CUDA packages (constants in device memory, copied in place). fp32 without TF32; 1e-3 against the
    torch modules (other kernels); the swap back to the base is exact all the same."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    built = load_model("tiny-sd15")
    plan = validate_plan(built.family, parse_stages(AOTI_STAGES))
    build_engines(built, BuildRequest(plan, "aoti", "fp32", tmp_path, device="cuda", networks=("unet", "text_encoder")))
    base = load_model("tiny-sd15")
    _check_swaps(_open_all(tmp_path, base, "cuda"), base, lora_file, tol=1e-3)


@pytest.fixture(scope="module")
def ort_engines(tmp_path_factory):
    """ONNX Runtime UNets (standard and dilated) and text encoder of fresh base weights."""
    base = load_model("tiny-sd15")
    out = tmp_path_factory.mktemp("engines-ort-lora")
    plan = validate_plan(base.family, parse_stages(AOTI_STAGES))
    build_engines(base, BuildRequest(plan, "onnxruntime", "fp32", out, networks=("unet", "text_encoder")))
    return out


def test_onnxruntime_sessions_take_the_lora(ort_engines, lora_file, one_thread):
    base = load_model("tiny-sd15")
    _check_swaps(_open_all(ort_engines, base), base, lora_file)


def test_kohya_file_swaps_as_the_diffusers_one(ort_engines, tmp_path, one_thread):
    base = load_model("tiny-sd15")
    lora = _random_lora(base, seed=3)
    nets = _open_all(ort_engines, base)
    swap = LoraSwap(nets, base, "REBUILD")
    swap.swap([LoraSpec(save_diffusers(lora, tmp_path / "d.safetensors"), 0.5)])
    a = _outputs(nets, base)
    swap.swap([LoraSpec(save_kohya(lora, tmp_path / "k.safetensors", 2.0), 1.0)])  # alpha = r / 2 halves it
    for name, y in _outputs(nets, base).items():
        assert _rel(y, a[name]) <= REL_TOL, name


def test_backends_that_cannot_swap_are_refused(tmp_path):
    base = load_model("tiny-sd15")
    for name in ("torch", "tensorrt"):
        assert get_backend(name).swap_note
        with pytest.raises(SwapRefused, match=f"^{name} engines cannot take a LoRA without a rebuild: .*; build "
                                              "engines that can with: REBUILD$"):
            LoraSwap(EngineNetworks({}, torch.device("cpu"), name), base, "REBUILD")
    assert not get_backend("aoti").swap_note and not get_backend("onnxruntime").swap_note


class _Package:
    """A loaded package's stand-in that lacks one constant (as if Inductor had folded it into another)."""

    def __init__(self, names):
        self.names = names

    def get_constant_fqns(self):
        return self.names


def test_a_package_without_the_constant_is_refused():
    from megafusion.engine.aoti_backend import AotiRunner

    base = load_model("tiny-sd15")
    name = next(n for n, _ in base.unet.named_parameters() if n.endswith("attn2.to_out.0.weight"))
    runner = AotiRunner.__new__(AotiRunner)
    runner.spec, runner.path, runner.device = network_spec(base.family, "unet", "fp32", 1), Path("p.pt2"), torch.device("cpu")
    runner.model = _Package([f"unet.{n}" for n, _ in base.unet.named_parameters() if n != name])
    weights = {name: base.unet.get_parameter(name).detach()}
    with pytest.raises(WeightSwapError, match=rf"^p.pt2: the package holds no constant for unet.{name} "):
        get_backend("aoti").swap_weights(runner, base.unet, "unet", weights)


def _generate(args, capsys) -> tuple[int, str, str]:
    code = generate_main(["--model", "tiny-sd15", "--prompt", "a fox", "--stages", AOTI_STAGES, "--seed", "1",
                          "--device", "cpu", "--no-progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_generate_swaps_the_lora_into_aoti_engines(sd15_aoti, lora_file, tmp_path, capsys):
    code, out, err = _generate(["--engines", str(sd15_aoti), "--lora", f"{lora_file}:0.7",
                                "--output", str(tmp_path / "engines.png")], capsys)
    assert code == 0, err
    assert "lora swapped into 3 aoti engines" in out and "without recompiling" in out
    assert _generate(["--lora", f"{lora_file}:0.7", "--output", str(tmp_path / "torch.png")], capsys)[0] == 0
    assert _generate(["--output", str(tmp_path / "base.png")], capsys)[0] == 0
    img = {k: np.asarray(Image.open(tmp_path / f"{k}.png")).astype(int) for k in ("engines", "torch", "base")}
    assert np.abs(img["engines"] - img["torch"]).max() <= 1
    assert np.abs(img["torch"] - img["base"]).max() > 10  # the LoRA shows in the image


def test_generate_refusals_name_the_backend_and_the_file(tmp_path, lora_file, capsys):
    engines = tmp_path / "torch-engines"
    base = load_model("tiny-sd15")
    build_engines(base, BuildRequest(validate_plan(base.family, parse_stages(AOTI_STAGES)), "torch", "fp32", engines))
    code, out, err = _generate(["--engines", str(engines), "--lora", str(lora_file), "--output",
                                str(tmp_path / "a.png")], capsys)
    assert code == 2 and not (tmp_path / "a.png").exists()
    assert "torch engines cannot take a LoRA without a rebuild" in err and "--backend aoti" in err
    assert len(err.strip().splitlines()) == 1
    xl = save_diffusers(_random_lora(load_model("tiny-sdxl")), tmp_path / "xl.safetensors")
    code, out, err = _generate(["--engines", str(engines), "--lora", str(xl), "--output", str(tmp_path / "b.png")],
                               capsys)
    assert code == 2 and str(xl) in err and "engines:" not in out  # refused before the engines open


def test_build_engines_fuses_the_lora_into_the_key(tmp_path, lora_file, capsys):
    """`mf-build-engines --lora`: entries keyed by the fused weights (torch entries: no export, instant)."""
    from megafusion.cli.build_engines import main as build_main
    from megafusion.engine.fingerprint import network_fingerprint

    out = tmp_path / "e"
    assert build_main(["--model", "tiny-sd15", "--stages", AOTI_STAGES, "--backend", "torch", "--device", "cpu",
                       "--lora", f"{lora_file}:0.7", "--output", str(out)]) == 0
    fused = load_model("tiny-sd15")
    fuse_loras(fused, [LoraSpec(lora_file, 0.7)])
    keys = {e.key.network: e.key.weights for e in EngineCache(out).entries().values()}
    assert keys["unet"] == network_fingerprint(fused, "unet") != network_fingerprint(load_model("tiny-sd15"), "unet")
    assert keys["text_encoder"] == network_fingerprint(fused, "text_encoder")  # the fused tensors' own key
    xl = save_diffusers(_random_lora(load_model("tiny-sdxl")), tmp_path / "xl.safetensors")
    capsys.readouterr()
    assert build_main(["--model", "tiny-sd15", "--backend", "torch", "--device", "cpu", "--lora", str(xl),
                       "--output", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert str(xl) in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "f" / "manifest.json").exists()


def test_an_ort_fused_model_is_refused_with_the_rebuild_command(tmp_path, lora_file, one_thread):
    """ORT's attention fusion packs Q, K and V into one initializer: no tensor of the model is the base to_k alone."""
    base = load_model("tiny-sd15")
    plan = validate_plan(base.family, parse_stages(AOTI_STAGES))
    build_engines(base, BuildRequest(plan, "onnxruntime", "fp32", tmp_path, ort_optimize="cpu",
                                     networks=("unet-standard",)))
    with pytest.raises(SwapRefused, match=r"model.onnx: no initializer holds unet\..*\.to_[qkv]\.weight alone .*; "
                                          r"rebuild with: REBUILD$"):
        LoraSwap(_open_all(tmp_path, base), base, "REBUILD").swap([LoraSpec(lora_file, 1.0)])
