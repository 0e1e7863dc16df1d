"""ONNX export of every network of tiny-sdxl and tiny-sd15: one dynamic-shape model per network serves two
stage shapes, and ONNX Runtime matches the torch module at both.

Tolerance (fp32): |ort - torch| <= 1e-4 + 1e-4 |torch| elementwise (measured: about 1e-5 at most).
fp16 exports are checked for dtypes and against the fp32 module within 5% of the output's range.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from megafusion.core.dilation import mid_dilation, mid_dilation_of
from megafusion.export.onnx_export import cast_copy, export_onnx
from megafusion.core.wrappers import wrap
from megafusion.core.plan import Stage, validate_plan
from megafusion.core.specs import plan_requirements, unet_spec, vae_specs

ATOL = RTOL = 1e-4
LATENTS = (16, 32)  # stage 1 (128 px) and stage 2 (256 px) of the tiny models


def _requirements(bundle):
    plan = validate_plan(bundle.family, [Stage(128, 128, 2), Stage(256, 256, 2)])
    return {r.spec.name: r.spec for r in plan_requirements(bundle.family, plan)}


@pytest.fixture(scope="module", params=["tiny-sdxl", "tiny-sd15"])
def exported(request, tmp_path_factory):
    """Every network of one tiny family exported once: (bundle, {spec name: (spec, ExportResult)})."""
    bundle = request.getfixturevalue(request.param.replace("-", "_"))
    out = tmp_path_factory.mktemp(request.param)
    before = mid_dilation_of(bundle.unet)  # the torch backend leaves its last dilation set
    results = {name: (spec, export_onnx(bundle, spec, out / f"{name}.onnx"))
               for name, spec in _requirements(bundle).items()}
    for name, (_, res) in results.items():  # shown with -s: the closing note's sizes and times
        print(f"\n{request.param} {name}: {res.seconds:.2f} s, {res.bytes / 1024:.0f} KiB")
    assert mid_dilation_of(bundle.unet) == before  # export restores it
    return bundle, results


def _torch_out(bundle, spec, inputs):
    module = bundle.module_for(spec.network)
    with torch.no_grad(), mid_dilation(bundle.unet, spec.dilation):
        out = wrap(module, spec, bundle.family.is_xl)(*inputs)
    return out if isinstance(out, tuple) else (out,)


def _ort_out(path, spec, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})


def _compare(bundle, spec, path, axes):
    inputs = spec.sample_inputs(axes, seed=sum(axes.values()))
    ref, got = _torch_out(bundle, spec, inputs), _ort_out(path, spec, inputs)
    assert len(ref) == len(got) == len(spec.outputs)
    for r, g, t in zip(ref, got, spec.outputs):
        assert g.shape == tuple(r.shape) == t.concrete(axes)
        np.testing.assert_allclose(g, r.numpy(), atol=ATOL, rtol=RTOL, err_msg=f"{spec.name}.{t.name} at {axes}")


@pytest.mark.parametrize("name", ["unet-standard-fp32", "unet-dilated-fp32", "vae_decoder-fp32", "vae_encoder-fp32"])
def test_spatial_networks_match_torch_at_two_stage_shapes(exported, name):
    bundle, results = exported
    spec, res = results[name]
    batch = spec.batch_range[1]
    for lat in LATENTS:
        _compare(bundle, spec, res.files[0], spec.axes(batch, lat, lat, bundle.family.vae_scale))


@pytest.mark.parametrize("batch", [1, 2])
def test_text_encoders_match_torch(exported, batch):
    bundle, results = exported
    for name, (spec, res) in results.items():
        if name.startswith("text_encoder"):
            _compare(bundle, spec, res.files[0], spec.axes(batch, 16, 16, 8))


def test_unet_batch_one_and_non_square(exported):
    bundle, results = exported
    spec, res = results["unet-dilated-fp32"]
    _compare(bundle, spec, res.files[0], spec.axes(1, 16, 32, bundle.family.vae_scale))


def test_graph_has_named_dynamic_axes_and_inferred_shapes(exported):
    _, results = exported
    spec, res = results["unet-standard-fp32"]
    model = onnx.load(str(res.files[0]))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["sample"] == ["batch", 4, "height", "width"]
    assert dims["timestep"] == [1]
    out = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out == ["batch", 4, "height", "width"]
    assert len(model.graph.value_info) > 100  # shape inference ran
    assert not [n for n in model.graph.node if n.op_type == "Identity"]  # clean-up ran


def test_dilated_export_differs(exported):
    bundle, results = exported
    spec, _ = results["unet-standard-fp32"]
    inputs = spec.sample_inputs(spec.axes(2, 16, 16, bundle.family.vae_scale))
    std = _ort_out(results["unet-standard-fp32"][1].files[0], spec, inputs)[0]
    dil = _ort_out(results["unet-dilated-fp32"][1].files[0], spec, inputs)[0]
    assert np.abs(std - dil).max() > 1e-3  # the mid-block dilation is really in the graph


def test_fp16_export(tiny_sdxl, tmp_path):
    spec = unet_spec(tiny_sdxl.family, "fp16", dilation=2)
    res = export_onnx(tiny_sdxl, spec, tmp_path / "unet16.onnx")
    assert tiny_sdxl.unet.dtype == torch.float32  # exported from a cast copy
    sess = ort.InferenceSession(str(res.files[0]), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    assert types == {"sample": "tensor(float16)", "timestep": "tensor(float)", "encoder_hidden_states":
                     "tensor(float16)", "text_embeds": "tensor(float16)", "time_ids": "tensor(float)"}
    inputs = spec.sample_inputs(spec.axes(2, 32, 32, 8))
    got = sess.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})[0]
    assert got.dtype == np.float16
    ref = _torch_out(tiny_sdxl, unet_spec(tiny_sdxl.family, "fp32", 2), [x.float() for x in inputs])[0].numpy()
    assert np.abs(got.astype(np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_vae_stays_fp32_where_asked(tiny_sdxl):
    plan = validate_plan(tiny_sdxl.family, [Stage(128, 128, 1), Stage(256, 256, 1)])
    names = {r.spec.name for r in plan_requirements(tiny_sdxl.family, plan, "fp16")}
    assert {"vae_decoder-fp32", "vae_encoder-fp32", "unet-standard-fp16"} <= names  # force_upcast VAE


def test_cast_copy_shares_nothing_and_casts(tiny_sd15):
    vae16 = cast_copy(tiny_sd15.vae, torch.float16)
    assert vae16.dtype == torch.float16 and tiny_sd15.vae.dtype == torch.float32
    p16, p32 = next(vae16.parameters()), next(tiny_sd15.vae.parameters())
    assert p16.data_ptr() != p32.data_ptr() and torch.equal(p16.float(), p32.half().float())


def test_external_data(tiny_sd15, tmp_path):
    _, dec = vae_specs(tiny_sd15.family)
    res = export_onnx(tiny_sd15, dec, tmp_path / "dec.onnx", external_threshold=0)
    assert [f.name for f in res.files] == ["dec.onnx", "dec.onnx.data"]
    assert res.files[1].stat().st_size > res.files[0].stat().st_size
    assert not list(tmp_path.glob(".export-*"))  # the raw export's temp folder is gone
    _compare(tiny_sd15, dec, res.files[0], dec.axes(1, 32, 32, 8))


def test_inline_save_reads_the_exporters_external_data(tmp_path):
    """Below the threshold the model is saved inline, even when the raw export kept its weights in a .data file
    of its temp folder (dynamo exports do): the saved file must open after that folder is gone."""
    import shutil

    from onnx import TensorProto, helper, numpy_helper

    from megafusion.export.onnx_export import PROTOBUF_LIMIT, _finish

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(w, "w")])
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    onnx.save(helper.make_model(graph), raw_dir / "raw.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="raw.onnx.data", size_threshold=0)
    files = _finish(raw_dir / "raw.onnx", tmp_path / "model.onnx", False, PROTOBUF_LIMIT)
    shutil.rmtree(raw_dir)
    assert files == (tmp_path / "model.onnx",)
    x = np.ones((1, 64), np.float32)
    (y,) = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-6)
