"""Static FP8 input scales for a plan (runtime/fp8_calibration.py) and their store (engine/fp8_scales.py), on the
tiny SDXL UNet on the CPU: the calibration's scale per layer is the largest input that layer sees over the recipe's
runs (checked with hooks of our own), a second start loads the same scales instead of calibrating, and anything
that changes what the scales depend on (weights, layers, recipe, plan, dilation) is another key."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.fp8 import FP8_MAX, Fp8Linear, Fp8Policy, fp8_scheme, quantize_unet
from megafusion.engine.fp8_scales import Fp8Calibration, ScaleStore
from megafusion.runtime.fp8_calibration import calibrate_for_plan, scales_key, static_scales

STATIC = Fp8Policy(activations="static")
RECIPE = Fp8Calibration(timesteps=(901, 301))  # two timesteps: the recipe's shape, less CPU time


@pytest.fixture(scope="module")
def plan():
    fam = load_model("tiny-sdxl").family
    return validate_plan(fam, [Stage(128, 128, 2), Stage(192, 160, 1)], 160, 192)


def _quantized():
    b = load_model("tiny-sdxl")
    quantize_unet(b.unet, STATIC)
    return b


def _layers(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, Fp8Linear)}


def test_scale_is_the_largest_input_each_layer_saw(plan):
    b = _quantized()
    seen: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(
                 n, max(seen.get(n, 0.0), float(args[0].abs().max()))))
             for n, m in _layers(b.unet).items()]
    try:
        scales = calibrate_for_plan(b, plan, 3, True, "cpu", RECIPE)
    finally:
        for h in hooks:
            h.remove()
    assert set(scales) == set(seen) == set(_layers(b.unet)) and len(scales) > 0
    for n, s in scales.items():
        assert s == pytest.approx(seen[n] / FP8_MAX, rel=1e-6), n
        assert float(_layers(b.unet)[n].input_scale) == pytest.approx(s, rel=1e-6)  # and set on the layer


def test_second_start_loads_the_same_scales_and_the_same_output(plan, tmp_path):
    store = ScaleStore(tmp_path)
    first_b, second_b = _quantized(), _quantized()
    first = static_scales(first_b, "w1", STATIC, plan, 2, True, "cpu", store, RECIPE)
    assert not first.loaded and first.seconds > 0 and store.path(first.key).is_file()
    assert "calibrated in" in first.line() and f"{len(first.scales)} layers" in first.line()
    second = static_scales(second_b, "w1", STATIC, plan, 2, True, "cpu", store, RECIPE)
    assert second.loaded and second.scales == first.scales and "loaded from the scale store" in second.line()
    g = torch.Generator().manual_seed(5)
    x, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    extra = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[128.0] * 6] * 2)}
    with torch.inference_mode():
        a, c = (bb.unet(x, torch.tensor(500), encoder_hidden_states=ehs, added_cond_kwargs=extra,
                        return_dict=False)[0] for bb in (first_b, second_b))
    assert torch.equal(a, c)


@pytest.mark.parametrize("change", ["weights", "recipe", "plan", "dilation", "cfg", "policy"])
def test_what_the_scales_depend_on_is_in_the_key(plan, change):
    base = dict(weights="w1", policy=STATIC, recipe=RECIPE, plan=plan, dilation=2, cfg=True)
    other = dict(base)
    if change == "weights":
        other["weights"] = "w2"
    elif change == "recipe":
        other["recipe"] = dataclasses.replace(RECIPE, seed=7)
    elif change == "plan":
        other["plan"] = validate_plan(load_model("tiny-sdxl").family, [Stage(128, 128, 2), Stage(256, 256, 1)],
                                      256, 256)
    elif change == "dilation":
        other["dilation"] = 3
    elif change == "cfg":
        other["cfg"] = False
    else:
        other["policy"] = Fp8Policy(roles=("ff_in", "ff_out"), activations="static")
    keys = [scales_key(d["weights"], d["policy"], d["recipe"], d["plan"], d["dilation"], d["cfg"], torch.bfloat16,
                       "cpu") for d in (base, other)]
    assert keys[0].digest() != keys[1].digest()


@pytest.mark.parametrize("damage", ["not json", "foreign key", "nan scale", "missing layer"])
def test_a_bad_file_is_calibrated_again_and_replaced(plan, tmp_path, damage):
    store = ScaleStore(tmp_path)
    good = static_scales(_quantized(), "w1", STATIC, plan, 2, True, "cpu", store, RECIPE)
    path = store.path(good.key)
    data = json.loads(path.read_text())
    if damage == "not json":
        path.write_text("{")
    elif damage == "foreign key":
        data["key"]["weights"] = "w9"
        path.write_text(json.dumps(data))
    elif damage == "nan scale":
        data["scales"][next(iter(data["scales"]))] = float("nan")
        path.write_text(json.dumps(data))
    else:
        data["scales"].pop(next(iter(data["scales"])))
        path.write_text(json.dumps(data))
    again = static_scales(_quantized(), "w1", STATIC, plan, 2, True, "cpu", store, RECIPE)
    assert not again.loaded and again.scales == good.scales
    assert json.loads(path.read_text())["scales"] == good.scales  # replaced by a whole, valid file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


def test_policy_and_scheme():
    assert fp8_scheme(Fp8Policy()) == ("e4m3 rows: self_attn_qkv,cross_attn_q,attn_out,ff_in,ff_out; fast accum")
    assert fp8_scheme(STATIC) == fp8_scheme(Fp8Policy()) + "; static inputs"
    with pytest.raises(ValueError, match="FP8 activation scales 'tensor': choose from token, static"):
        Fp8Policy(activations="tensor")
    with pytest.raises(ValueError, match="calibration margin nan"):
        Fp8Calibration(margin=float("nan"))
    with pytest.raises(ValueError, match=r"calibration timesteps \(\)"):
        Fp8Calibration(timesteps=())


def test_fast_networks_refuse_a_static_policy_without_a_calibration():
    from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks

    b = load_model("tiny-sdxl")
    with pytest.raises(ValueError, match="static FP8 policy needs fp8_scales"):
        FastTorchNetworks(b, FastOptions(unet_fp8=STATIC, compile_unet=False, compile_vae=False))
    assert not _layers(b.unet)  # refused before anything changed


def test_fast_networks_set_the_scales_before_any_compile(plan):
    from megafusion.engine.torch_fast import FastOptions, FastTorchNetworks
    from megafusion.runtime.fp8_calibration import static_scales as provide

    b = load_model("tiny-sdxl")
    nets = FastTorchNetworks(b, FastOptions(unet_fp8=STATIC, compile_unet=False, compile_vae=False,
                                            channels_last=False, cudnn_benchmark=False),
                             fp8_scales=lambda bb: provide(bb, "w1", STATIC, plan, 2, True, "cpu", None, RECIPE))
    layers = _layers(b.unet)
    assert layers and all(m.input_scale is not None for m in layers.values())
    assert not nets.fp8_static.loaded and set(nets.fp8_static.scales) == set(layers)
