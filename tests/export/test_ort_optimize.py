"""ONNX Runtime's transformer optimizer on our exports (`megafusion.export.ort_optimize`), tiny-sdxl, fp32, CPU.

Attention is fused (UNet self-attention to `Attention`, cross-attention and the VAE's SDPA attention to
`MultiHeadAttention`) and no attention Softmax is left. One dynamic-shape model per network still matches the
torch module at two latent sizes: |ort - torch| <= 1e-4 + 1e-4 |torch| elementwise (fp32; measured at most
2e-6 for the UNet, 1.2e-5 for the VAE decoder). fp16 (converted after fusion) is held to 5% of the output's
range, as the fp16 export is. The `cuda` target adds CUDA-only ops and cannot run here; it is checked
structurally.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from megafusion.core.dilation import mid_dilation
from megafusion.export.onnx_export import PROTOBUF_LIMIT, ExportError, export_onnx
from megafusion.core.wrappers import wrap
from megafusion.export.ort_optimize import optimize_onnx
from megafusion.core.specs import unet_spec, vae_specs

ATOL = RTOL = 1e-4
LATENTS = ((16, 16), (32, 24))  # two stage sizes, one of them not square
NETWORKS = ("unet-standard-fp32", "unet-dilated-fp32", "vae_decoder-fp32")


@pytest.fixture(scope="module")
def optimized(tiny_sdxl, tmp_path_factory):
    """{spec name: (spec, plain export path, OptimizeResult)} for the UNet (both variants) and the VAE decoder;
    the VAE's weights go to external data, both in the export and in the optimized model."""
    out = tmp_path_factory.mktemp("ort-optimize")
    fam = tiny_sdxl.family
    specs = (unet_spec(fam, "fp32", 1), unet_spec(fam, "fp32", 2), vae_specs(fam)[1])
    results = {}
    for spec in specs:
        external = 0 if spec.network == "vae_decoder" else PROTOBUF_LIMIT
        (out / spec.name).mkdir()
        plain = export_onnx(tiny_sdxl, spec, out / spec.name / "model.onnx", external_threshold=external).files[0]
        res = optimize_onnx(plain, out / f"{spec.name}-cpu.onnx", spec, "cpu", external_threshold=external)
        print(f"\n{spec.name}: optimized in {res.seconds:.1f} s, {res.fused}")  # shown with -s
        results[spec.name] = (spec, plain, res)
    return results


def _ops(path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def _run(path, spec, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})


def _torch(bundle, spec, inputs):
    with torch.no_grad(), mid_dilation(bundle.unet, spec.dilation):
        out = wrap(bundle.module_for(spec.network), spec, bundle.family.is_xl)(*inputs)
    return out.numpy()


@pytest.mark.parametrize("name", NETWORKS)
def test_cpu_target_fuses_every_attention(optimized, name):
    spec, plain, res = optimized[name]
    before, after = _ops(plain), _ops(res.files[0])
    assert before["Softmax"] > 0 and "Softmax" not in after  # every attention fused, none left unfused
    assert after["MultiHeadAttention"] == res.fused["MultiHeadAttention"] > 0
    assert after["MultiHeadAttention"] + after.get("Attention", 0) == before["Softmax"]
    assert not {"GroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"} & set(after)  # CUDA-only ops stay out


@pytest.mark.parametrize("name", NETWORKS)
def test_optimized_model_matches_torch_at_two_sizes(tiny_sdxl, optimized, name):
    spec, _, res = optimized[name]
    for h, w in LATENTS:
        axes = spec.axes(spec.batch_range[1], h, w, tiny_sdxl.family.vae_scale)
        inputs = spec.sample_inputs(axes, seed=h + w)
        got, ref = _run(res.files[0], spec, inputs)[0], _torch(tiny_sdxl, spec, inputs)
        assert got.shape == ref.shape == spec.outputs[0].concrete(axes)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL, err_msg=f"{name} at {h}x{w}")


def test_io_names_and_dynamic_axes_unchanged(optimized):
    _, plain, res = optimized["unet-standard-fp32"]

    def io(path):
        g = onnx.load(str(path)).graph
        t = [v.type.tensor_type for v in (*g.input, *g.output)]
        return [(v.name, tt.elem_type, [d.dim_param or d.dim_value for d in tt.shape.dim])
                for v, tt in zip((*g.input, *g.output), t)]
    assert io(res.files[0]) == io(plain)
    assert io(plain)[0] == ("sample", 1, ["batch", 4, "height", "width"])


def test_cuda_target_fp16_unet_is_a_valid_model(tiny_sdxl, optimized, tmp_path):
    """`cuda`: GroupNorm, NhwcConv, BiasSplitGelu, packed-QKV MultiHeadAttention exist only on the CUDA EP, so
    the model cannot run on this CPU: it must pass onnx.checker, keep the spec's I/O (fp16, with the timestep and
    time ids fp32) and keep the timestep embedding's arguments fp32. The CUDA EP ran on a GPU (benchmarks/RESULTS.md)."""
    _, plain, _ = optimized["unet-standard-fp32"]
    spec = unet_spec(tiny_sdxl.family, "fp16", 1)
    res = optimize_onnx(plain, tmp_path / "unet-cuda.onnx", spec, "cuda")
    onnx.checker.check_model(str(res.files[0]))
    assert {"GroupNorm", "NhwcConv", "BiasSplitGelu", "MultiHeadAttention"} <= set(res.fused)
    model = onnx.load(str(res.files[0]))
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert types == {"sample": 10, "timestep": 1, "encoder_hidden_states": 10, "text_embeds": 10, "time_ids": 1,
                     "eps": 10}
    producer = {o: n for n in model.graph.node for o in n.output}
    sins = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert sins
    for node in sins:  # back to the graph inputs: no cast to fp16 on the way
        todo = list(node.input)
        while todo:
            p = producer.get(todo.pop())
            if p is not None:
                assert not (p.op_type == "Cast" and p.attribute[0].i == 10), f"{node.name} is fed fp16 by {p.name}"
                todo.extend(p.input)


def test_fp16_from_fp32_export_runs_on_cpu(tiny_sdxl, optimized, tmp_path):
    _, plain, _ = optimized["vae_decoder-fp32"]
    spec16, spec32 = vae_specs(tiny_sdxl.family, "fp16")[1], vae_specs(tiny_sdxl.family)[1]
    res = optimize_onnx(plain, tmp_path / "dec16.onnx", spec16, "cpu")
    axes = spec16.axes(1, 16, 24, 8)
    inputs = spec16.sample_inputs(axes)
    got = _run(res.files[0], spec16, inputs)[0]
    ref = _torch(tiny_sdxl, spec32, [x.float() for x in inputs])
    assert got.dtype == np.float16 and "MultiHeadAttention" in res.fused
    assert np.abs(got.astype(np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_external_data_in_and_out(optimized):
    spec, plain, res = optimized["vae_decoder-fp32"]
    assert plain.with_name("model.onnx.data").is_file()  # the source had its weights outside too
    assert [f.name for f in res.files] == ["vae_decoder-fp32-cpu.onnx", "vae_decoder-fp32-cpu.onnx.data"]
    assert res.files[1].stat().st_size > res.files[0].stat().st_size
    assert [f.name for f in optimized["unet-standard-fp32"][2].files] == ["unet-standard-fp32-cpu.onnx"]
    assert not list(res.files[0].parent.glob(".ort-optimize-*"))  # the temp folders are gone


def test_fp16_export_is_refused_naming_the_network(tiny_sdxl, optimized, tmp_path):
    _, plain, _ = optimized["vae_decoder-fp32"]
    model = onnx.load(str(plain))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.elem_type = 10  # what an fp16 export declares
    onnx.save(model, str(tmp_path / "dec16.onnx"))
    with pytest.raises(ExportError, match="vae_decoder-fp16.*fp16 export.*fp32"):
        optimize_onnx(tmp_path / "dec16.onnx", tmp_path / "out.onnx", vae_specs(tiny_sdxl.family, "fp16")[1], "cpu")


def test_wrong_network_and_bad_target_are_errors(tiny_sdxl, optimized, tmp_path):
    _, plain, _ = optimized["vae_decoder-fp32"]
    with pytest.raises(ExportError, match="unet-standard-fp32.*inputs/outputs"):
        optimize_onnx(plain, tmp_path / "x.onnx", unet_spec(tiny_sdxl.family), "cpu")
    with pytest.raises(ValueError, match="'gpu'"):
        optimize_onnx(plain, tmp_path / "x.onnx", vae_specs(tiny_sdxl.family)[1], "gpu")
    assert not (tmp_path / "x.onnx").exists()


def test_fusion_failures_name_the_network(tiny_sdxl, optimized, tmp_path, monkeypatch):
    from megafusion.export import ort_optimize

    _, plain, _ = optimized["vae_decoder-fp32"]
    spec = vae_specs(tiny_sdxl.family)[1]
    monkeypatch.setattr(ort_optimize, "_fuse_sdpa_attention", lambda model: 0)  # ORT's own VAE fusion only
    with pytest.raises(ExportError, match="vae_decoder-fp32 left 1 attention softmax"):
        optimize_onnx(plain, tmp_path / "x.onnx", spec, "cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("pattern matcher crashed")
    monkeypatch.setattr("onnxruntime.transformers.optimizer.optimize_model", broken)
    with pytest.raises(ExportError, match="cpu optimization of vae_decoder-fp32 failed: RuntimeError: pattern"):
        optimize_onnx(plain, tmp_path / "x.onnx", spec, "cpu")
    assert not (tmp_path / "x.onnx").exists()


def test_ort_fusion_class_is_restored_after_the_call(optimized):
    import sys

    from onnxruntime.transformers import optimizer

    cls = sys.modules[optimizer.UnetOnnxModel.__module__].FusionAttentionUnet
    assert cls.get_num_heads.__qualname__ == "FusionAttentionUnet.get_num_heads"  # ORT's own again
