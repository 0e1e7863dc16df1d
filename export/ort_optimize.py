"""ONNX Runtime's transformer graph optimizer on an exported network: attention to fused contrib ops.

Our exports express attention as MatMul + Softmax + MatMul, which ONNX Runtime runs by materializing the
N x N score matrix (10 to 17 GB per softmax for SDXL at 2048 px). `optimize_onnx` runs
`onnxruntime.transformers.optimizer.optimize_model` (Python fusions only, `opt_level=0`, as ORT's stable
diffusion script does) with the model type of the network (`unet`, `vae`, `clip`) and fusion options for a
target execution provider:

- `cpu`: only fusions whose contrib ops the CPU EP implements: attention (self-attention to `Attention`,
  cross-attention and the VAE's attention to `MultiHeadAttention`; the CPU kernel refuses packed QKV/KV),
  LayerNorm/SkipLayerNorm, Gelu variants. Verified by running the result on the CPU EP.
- `cuda`: the set ORT's stable diffusion script uses for the CUDA EP: also GroupNorm, SkipGroupNorm,
  BiasSplitGelu, NhwcConv, BiasAdd (CUDA-only ops) and, for fp16 models, packed QKV/KV.

Two gaps of ORT 1.32 are bridged here: its UNet attention fusion crashes under NumPy >= 2.4 (see
`_numpy_head_count_fix`), and its VAE attention fusion only knows the pre-SDPA diffusers graph, so the
attention torch's `scaled_dot_product_attention` exports (the VAE's mid-block) is fused by
`_fuse_sdpa_attention` into `MultiHeadAttention` (memory-efficient kernels on CUDA, no N x N buffer).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .onnx_export import PROTOBUF_LIMIT, ExportError
from ..core.specs import UNET, VAE_DECODER, VAE_ENCODER, NetworkSpec

TARGETS = ("cpu", "cuda")
"""Execution providers the optimized graph is for."""

ORT_OPTIMIZE_CHOICES = ("none", *TARGETS)
"""What a build may ask for: `none` keeps the exported graph as it is."""

_ELEM = {"float32": 1, "float16": 10, "int32": 6}
"""ONNX TensorProto element types of the spec dtypes."""

_MUST_FUSE = (UNET, VAE_ENCODER, VAE_DECODER)
"""Networks whose attention runs over latent tokens (16k to 65k at 2048 px): an unfused one is an error.
Text encoders (77 tokens) take whatever fuses: ORT's CLIP fusion does not match transformers 5's masked
attention, which costs nothing that matters at 77 tokens."""

SOURCE_PRECISION = "fp32"
"""The precision a network is exported at for fusion, whatever the engine's precision.

Our fp16 exports do not fuse: the trace of an fp16 module carries Casts (the fp32 timestep path, the softmax
upcast) that break ORT's attention patterns (tiny SDXL UNet fp16: 0 of 16 attentions fused), and ORT's
GroupNorm fusion fails on fp16 weights. So fp16 engines are fused from the fp32 export and converted after
fusion with `convert_float_to_float16`, as ORT's own stable diffusion script does."""

_PATCH_LOCK = threading.Lock()


@dataclass(frozen=True)
class OptimizeResult:
    """What one optimization wrote."""

    files: tuple[Path, ...]
    """The model file first, then its external data file if any."""
    fused: dict[str, int]
    """Contrib (com.microsoft) ops in the result by type, e.g. {"MultiHeadAttention": 14, "GroupNorm": 61}."""
    seconds: float
    """Wall time of load, fusion, conversion and save."""


def model_type(spec: NetworkSpec) -> str:
    """The optimizer's model type for a network: `unet`, `vae` (either half) or `clip` (text encoders)."""
    if spec.network == UNET:
        return "unet"
    if spec.network in (VAE_ENCODER, VAE_DECODER):
        return "vae"
    return "clip"


def fusion_options(model_type_: str, target: str, fp16: bool):
    """ORT `FusionOptions` for `model_type_` (`unet`, `vae`, `clip`) on `target` (`cpu` or `cuda`)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    _check_target(target)
    opts = FusionOptions(model_type_)
    if target == "cpu":
        # No CPU kernels in ORT 1.32 for these contrib ops (they exist on the CUDA EP only).
        opts.enable_group_norm = opts.enable_skip_group_norm = False
        opts.enable_bias_splitgelu = opts.enable_nhwc_conv = opts.enable_bias_add = False
        # The CPU MultiHeadAttention kernel: "Packed QKV of shape (B, L, N, 3, H) not implemented for CPU".
        opts.enable_packed_qkv = opts.enable_packed_kv = False
    else:
        # As optimize_pipeline.py: packed QKV/KV feed the fp16 fused kernels; fp32 has none that takes them.
        opts.enable_packed_qkv = opts.enable_packed_kv = fp16
    return opts


def optimize_onnx(src: str | os.PathLike, dst: str | os.PathLike, spec: NetworkSpec, target: str, *,
                  external_threshold: int = PROTOBUF_LIMIT) -> OptimizeResult:
    """Fuses `src` (an fp32 export of `spec`'s network, external data beside it if any) for `target` and writes
    `dst` (`<dst>.data` when the weights exceed `external_threshold`), atomically: both files are written in a
    temp folder beside `dst` and moved into place.

    An fp16 `spec` is fused from the fp32 export and then converted (inputs and outputs the spec keeps fp32,
    such as the timestep, stay fp32). Input/output names, element types and dynamic axes are checked against
    `src` and `spec`. Raises ValueError for an unknown target, ExportError naming the network if the source
    does not fit the spec, if fusion fails, or if the UNet's or VAE's attention is left unfused.
    """
    _check_target(target)
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"optimizing {spec.name}: {src} does not exist")
    if src.resolve() == dst.resolve():
        raise ExportError(f"optimizing {spec.name}: source and destination are both {src}")
    import onnx

    source_io = _io_of(onnx.load(str(src), load_external_data=False).graph)
    convert = _check_source(spec, src, source_io)
    try:
        model = _fuse(src, spec, target, fp16=spec.precision == "fp16")
        if convert:
            _to_fp16(model, spec)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - one message naming the network, cause chained
        raise ExportError(f"ORT {target} optimization of {spec.name} failed: {type(e).__name__}: {e}") from e
    graph = model.model.graph
    _check_io(spec, source_io, _io_of(graph))
    left = sum(n.op_type == "Softmax" for n in graph.node)
    if spec.network in _MUST_FUSE and left:
        raise ExportError(f"ORT {target} optimization of {spec.name} left {left} attention softmax(es) unfused; "
                          "the graph would still materialize the N x N scores")
    fused = dict(sorted(Counter(n.op_type for n in graph.node if n.domain == "com.microsoft").items()))
    files = _save(model, dst, external_threshold)
    return OptimizeResult(files, fused, time.perf_counter() - t0)


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown ORT optimization target {target!r}; choose one of {', '.join(TARGETS)}")


def _io_of(graph) -> tuple[list, list]:
    """(inputs, outputs) as (name, element type, dims with dynamic axes by name)."""
    def sig(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, tuple(d.dim_param or d.dim_value for d in t.shape.dim)
    inits = {i.name for i in graph.initializer}
    return [sig(v) for v in graph.input if v.name not in inits], [sig(v) for v in graph.output]


def _check_source(spec: NetworkSpec, src: Path, io: tuple[list, list]) -> bool:
    """Whether the fused model needs fp16 conversion; refuses a source that is not an fp32 export of `spec`."""
    names = [n for n, _, _ in (*io[0], *io[1])]
    want = [t.name for t in (*spec.inputs, *spec.outputs)]
    if names != want:
        raise ExportError(f"optimizing {spec.name}: {src} has inputs/outputs {names}, the spec has {want}")
    types = [e for _, e, _ in (*io[0], *io[1])]
    spec_types = [_ELEM[t.dtype] for t in (*spec.inputs, *spec.outputs)]
    fp32_types = [_ELEM["float32"] if t.dtype == "float16" else _ELEM[t.dtype] for t in (*spec.inputs, *spec.outputs)]
    if types == fp32_types:
        return spec_types != fp32_types
    if spec.precision == "fp16" and types == spec_types:
        raise ExportError(f"optimizing {spec.name}: {src} is an fp16 export; ORT's fusions do not match fp16 "
                          "traces, so export the network at fp32 and pass the fp16 spec (converted after fusion)")
    raise ExportError(f"optimizing {spec.name}: {src} has element types {types}, expected {fp32_types}")


def _check_io(spec: NetworkSpec, before: tuple[list, list], after: tuple[list, list]) -> None:
    """Names and axes as exported, element types as the spec says."""
    spec_types = [_ELEM[t.dtype] for t in (*spec.inputs, *spec.outputs)]
    want = [(n, e, d) for (n, _, d), e in zip((*before[0], *before[1]), spec_types)]
    got = [*after[0], *after[1]]
    if got != want:
        diff = next(((w, g) for w, g in zip(want, got) if w != g), (want, got))
        raise ExportError(f"optimizing {spec.name} changed its inputs/outputs: expected {diff[0]}, got {diff[1]}")


def _fuse(src: Path, spec: NetworkSpec, target: str, fp16: bool):
    """ORT's fusions for the network's model type, then ours for SDPA attention; an ORT `OnnxModel`."""
    from onnxruntime.transformers.optimizer import optimize_model

    mt = model_type(spec)
    with _numpy_head_count_fix():
        model = optimize_model(str(src), model_type=mt, num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=fusion_options(mt, target, fp16))
    _fuse_sdpa_attention(model)
    return model


@contextlib.contextmanager
def _numpy_head_count_fix():
    """During the call, make ORT's UNet attention fusion read its head count with `.item()`.

    ORT 1.32's `FusionAttentionUnet.get_num_heads` does `int()` of a 1-element array, which NumPy >= 2.4
    refuses with TypeError, so no UNet attention fused at all. The original runs first; only on that
    TypeError is the count read again. Scoped to the call (and a lock) so nothing outlives it.
    """
    from onnxruntime.transformers import optimizer

    # The optimizer imports its modules top-level (ORT puts its folder on sys.path): patch the class it uses.
    cls = sys.modules[optimizer.UnetOnnxModel.__module__].FusionAttentionUnet
    original = cls.__dict__["get_num_heads"]

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        try:
            return original(self, reshape_q, is_torch2)
        except TypeError:
            return _concat_heads(self.model, reshape_q)

    with _PATCH_LOCK:
        cls.get_num_heads = get_num_heads
        try:
            yield
        finally:
            cls.get_num_heads = original


def _concat_heads(model, reshape) -> int:
    """Heads of a (B, S, heads, head_dim) Reshape: its shape is a constant or a Concat with a constant third
    entry; 0 if neither."""
    import numpy as np

    value = model.get_constant_value(reshape.input[1])
    if isinstance(value, np.ndarray) and value.shape == (4,):
        return max(int(value[2]), 0)
    parent = model.get_parent(reshape, 1)
    if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
        return 0
    value = model.get_constant_value(parent.input[2])
    return max(int(value.item()), 0) if isinstance(value, np.ndarray) and value.size == 1 else 0


def _fuse_sdpa_attention(model) -> int:
    """Unmasked attention as torch's SDPA exports it, fused to com.microsoft MultiHeadAttention; returns the count.

    Pattern (opset 17 TorchScript exporter): q, k, v of shape (B, S, D) -> Reshape (B, S, h, d) -> Transpose
    (k straight to (B, h, d, S)); q and k each multiplied by sqrt(scale); MatMul, Softmax(-1), MatMul with v;
    Transpose back and Reshape to (B, S, D). MultiHeadAttention takes q, k, v as (B, S, D) directly.
    """
    from onnx import helper

    in2nodes, out2node = model.input_name_to_nodes(), model.output_name_to_node()
    add, remove = [], []
    for softmax in model.get_nodes_by_op_type("Softmax"):
        m = _match_sdpa(model, softmax, in2nodes, out2node)
        if m is None:
            continue
        (q, k, v), heads, scale, out_nodes = m
        attrs = {"num_heads": heads} | ({"scale": scale} if scale is not None else {})
        add.append(helper.make_node("MultiHeadAttention", [q, k, v], [out_nodes[-1].output[0]],
                                    name=model.create_node_name("MultiHeadAttention", "SdpaAttention"),
                                    domain="com.microsoft", **attrs))
        remove += out_nodes
    if add:
        model.remove_nodes(remove)
        model.add_nodes(add)
        model.prune_graph(allow_remove_graph_inputs=False)  # the bypassed score path is dead now
    return len(add)


def _match_sdpa(model, softmax, in2nodes, out2node):
    """((q, k, v) names, heads, scale or None for the default, [out Transpose, out Reshape]) or None."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    if OnnxModel.get_node_attribute(softmax, "axis") not in (None, -1, 3):
        return None
    qk = model.match_parent(softmax, "MatMul", 0, out2node)
    qkv = _only_child(softmax, "MatMul", in2nodes)
    out_t = qkv and _only_child(qkv, "Transpose", in2nodes)
    out_r = out_t and _only_child(out_t, "Reshape", in2nodes)
    if qk is None or out_r is None or qkv.input[0] != softmax.output[0] or _perm(out_t) != [0, 2, 1, 3]:
        return None
    q = model.match_parent_path(qk, ["Mul", "Transpose", "Reshape"], [0, None, 0], out2node)
    k = model.match_parent_path(qk, ["Mul", "Transpose", "Reshape"], [1, None, 0], out2node)
    v = model.match_parent_path(qkv, ["Transpose", "Reshape"], [1, 0], out2node)
    if not (q and k and v) or _perm(q[1]) != [0, 2, 1, 3] or _perm(k[1]) != [0, 2, 3, 1] \
            or _perm(v[0]) != [0, 2, 1, 3]:
        return None
    heads = {_concat_heads(model, r) for r in (q[2], k[2], v[1])}
    ok, scale = _sdpa_scale(model, q, k)
    if len(heads) != 1 or 0 in heads or not ok:
        return None
    return (q[2].input[0], k[2].input[0], v[1].input[0]), heads.pop(), scale, [out_t, out_r]


def _only_child(node, op_type: str, in2nodes):
    kids = in2nodes.get(node.output[0], [])
    return kids[0] if len(kids) == 1 and kids[0].op_type == op_type else None


def _perm(transpose) -> list[int] | None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    return OnnxModel.get_node_attribute(transpose, "perm")


def _sdpa_scale(model, q: list, k: list) -> tuple[bool, float | None]:
    """(matched, scale) from the matched [Mul, Transpose, ...] paths of q and k: SDPA multiplies each by
    sqrt(scale). Both factors are constants (scale is their product), or both are Sqrt of one tensor computed as
    1 / sqrt(q.shape[-1]): the default scale, None."""
    import numpy as np

    fq, fk = (mul.input[1] if mul.input[0] == t.output[0] else mul.input[0] for mul, t in (q[:2], k[:2]))
    cq, ck = model.get_constant_value(fq), model.get_constant_value(fk)
    if isinstance(cq, np.ndarray) and isinstance(ck, np.ndarray) and cq.size == ck.size == 1:
        return True, float(cq.item()) * float(ck.item())
    sq, sk = model.get_parent(q[0], list(q[0].input).index(fq)), model.get_parent(k[0], list(k[0].input).index(fk))
    if not (sq and sk and sq.op_type == sk.op_type == "Sqrt" and sq.input[0] == sk.input[0]):
        return False, None
    div = model.get_parent(sq, 0)
    while div is not None and div.op_type == "Cast":  # an fp32 -> fp32 Cast, if still there
        div = model.get_parent(div, 0)
    one = model.get_constant_value(div.input[0]) if div is not None and div.op_type == "Div" else None
    if not isinstance(one, np.ndarray) or one.size != 1 or float(one.item()) != 1.0:
        return False, None
    dim = model.match_parent_path(div, ["Sqrt", "Cast", "Slice", "Shape"], [1, 0, 0, 0])
    if dim is None or dim[3].input[0] != q[1].output[0]:
        return False, None
    starts = model.get_constant_value(dim[2].input[1])  # the last axis: head_dim
    return isinstance(starts, np.ndarray) and starts.size == 1 and int(starts.item()) == -1, None


def _sinusoid_nodes(graph, fp32_inputs: list[str]) -> list[str]:
    """Names of the nodes between the inputs kept fp32 and the Sin/Cos they feed: the timestep (and time id)
    embedding arguments, e.g. 981 x frequency, which fp16 rounds by up to 0.25 rad."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    downstream, stack = set(), list(fp32_inputs)
    while stack:
        for n in consumers.get(stack.pop(), []):
            if n.name not in downstream:
                downstream.add(n.name)
                stack.extend(n.output)
    upstream, todo = set(), [n for n in graph.node if n.op_type in ("Sin", "Cos") and n.name in downstream]
    while todo:
        n = todo.pop()
        if n.name not in upstream:
            upstream.add(n.name)
            todo.extend(producer[i] for i in n.input if i in producer)
    return sorted(downstream & upstream)


def _to_fp16(model, spec: NetworkSpec) -> None:
    """fp16 weights and activations; I/O the spec keeps fp32 stay fp32, and so do the sinusoidal embeddings'
    arguments (diffusers computes those in fp32 too). ORT's default op block list applies."""
    keep = [t.name for t in (*spec.inputs, *spec.outputs) if t.dtype == "float32"]
    model.convert_float_to_float16(keep_io_types=keep, node_block_list=_sinusoid_nodes(model.model.graph, keep))


def _weights_bytes(graph) -> int:
    from onnx import helper

    total = 0
    for t in graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _save(model, dst: Path, external_threshold: int) -> tuple[Path, ...]:
    """`dst` and, for weights over the threshold, `<dst>.data` (one file, as `export_onnx` writes them)."""
    external = _weights_bytes(model.model.graph) > external_threshold
    data = dst.with_name(dst.name + ".data")
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".ort-optimize-{dst.stem}-") as tmp:
        staged = Path(tmp) / dst.name  # the same name, so the .data location recorded inside stays right
        model.save_model_to_file(str(staged), use_external_data_format=external)
        if external:
            os.replace(staged.with_name(data.name), data)
        else:
            data.unlink(missing_ok=True)
        os.replace(staged, dst)
    return (dst, data) if external else (dst,)
