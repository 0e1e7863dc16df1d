"""ONNX Runtime runner: CPU EP here; CUDA EP with IOBinding on torch tensors where onnxruntime-gpu is present.

On CUDA the session runs on the caller's torch stream (`user_compute_stream`), inputs and outputs are bound
in place (no host copies), and with `cuda_graph=True` each input shape gets its own captured graph
(`gpu_graph_id`), replayed from static buffers. Each session has its own CUDA arena that keeps its peak;
`shrink_arena` hands unused arena memory back after every run (for networks with large, rare transients,
such as the VAE at 2048 px). The CUDA path follows ORT's documented API; this repository's CI only
exercises the CPU path; both CUDA paths ran on a GPU (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.specs import UNET, VAE_DECODER, VAE_ENCODER, NetworkSpec
from .backend import (Backend, BackendUnavailable, BuildJob, BuildOutput, Log, NetworkExport, OpenContext,
                      WeightSwapError)
from .runners import infer_axes

NAME = "onnxruntime"
_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32}


def version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def shrink_config(device: torch.device) -> str:
    """The value of ORT's `memory.enable_memory_arena_shrinkage` run option for this device's arena."""
    return f"gpu:{device.index or 0}" if device.type == "cuda" else "cpu:0"


@dataclass
class _Graph:
    """Static buffers of one captured CUDA graph (one per input shape)."""

    graph_id: int
    """ORT's `gpu_graph_id` for this shape."""
    inputs: dict[str, torch.Tensor]
    """Input buffers the graph reads; each call copies into them."""
    outputs: dict[str, torch.Tensor]
    """Output buffers the graph writes."""
    binding: object
    """The `IOBinding` bound to those buffers."""


CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
"""The CUDA EP's `cudnn_conv_algo_search` values. Measured (SD1.5, fused, EXHAUSTIVE), every change of input
shape cost a session 1.6 to 2.4 s on its next run, even for shapes it had run before; a multi-stage plan changes
shape at every stage, so HEURISTIC is there to be measured against it."""


def cuda_provider_options(device: torch.device, stream: int, cuda_graph: bool, shrink_arena: bool,
                          conv_algo_search: str = "EXHAUSTIVE") -> dict[str, str]:
    """CUDA EP options: the caller's stream (IOBinding on torch tensors), optional CUDA graph, arena policy."""
    if conv_algo_search not in CONV_ALGO_SEARCH:
        raise ValueError(f"unknown cudnn_conv_algo_search {conv_algo_search!r}; choose one of "
                         f"{', '.join(CONV_ALGO_SEARCH)}")
    opts = {"device_id": str(device.index or 0), "has_user_compute_stream": "1", "user_compute_stream": str(stream),
            "enable_cuda_graph": "1" if cuda_graph else "0", "cudnn_conv_algo_search": conv_algo_search}
    if shrink_arena:  # regions sized as requested, so a shrink returns them whole
        opts["arena_extend_strategy"] = "kSameAsRequested"
    return opts


class OrtRunner:
    """One ONNX model in one InferenceSession."""

    def __init__(self, path: str | os.PathLike, spec: NetworkSpec, vae_scale: int, device: torch.device | str = "cpu",
                 cuda_graph: bool = False, threads: int | None = None, shrink_arena: bool = False,
                 optimization: str = "all", conv_algo_search: str = "EXHAUSTIVE"):
        self.spec, self.vae_scale = spec, vae_scale
        self.path = Path(path)
        self.device = torch.device(device)
        self._optimization, self._threads, self._conv_algo_search = optimization, threads, conv_algo_search
        self.initializers: dict[str, object] = {}
        """OrtValues given in place of the model file's initializers of these names (`reload`); kept alive here, as
        ORT requires for the session's lifetime."""
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.shrink_arena = shrink_arena
        """CUDA: free the arena's unused memory after each (non-graph) run; may be toggled between runs."""
        self.session = self._open()
        got = [i.name for i in self.session.get_inputs()]
        want = [t.name for t in spec.inputs]
        if got != want:
            raise RuntimeError(f"{path}: inputs {got} differ from the spec's {want}")
        self._graphs: dict[tuple, _Graph] = {}
        self.capturable = False  # see OnnxRuntimeBackend.capture_note

    def _open(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # `basic` (graph checks, kernel assignment, constant folding, no layout transforms) is for a load check:
        # on CPU, `all` on an fp16 model takes ~3.7x the model in RAM (measured: SD1.5 UNet 1.6 GB -> 6.1 GB).
        opts.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                         "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[self._optimization]
        if self._threads:
            opts.intra_op_num_threads = self._threads
        for name, value in self.initializers.items():
            opts.add_initializer(name, value)
        if self.device.type == "cuda":
            if not cuda_available():
                raise RuntimeError("onnxruntime's CUDAExecutionProvider is not available (install onnxruntime-gpu)")
            stream = torch.cuda.current_stream(self.device).cuda_stream
            cuda_opts = cuda_provider_options(self.device, stream, self.cuda_graph, self.shrink_arena,
                                              self._conv_algo_search)
            providers = [("CUDAExecutionProvider", cuda_opts)]
        else:
            providers = ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(self.path), opts, providers=providers)
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            # ORT's Python layer retries on the CPU EP when the CUDA EP fails to start: refuse, not run slow.
            raise RuntimeError(f"{self.path}: the CUDA EP did not start (session providers: "
                               f"{session.get_providers()}); check the CUDA/cuDNN libraries")
        return session

    def reload(self, initializers: dict[str, np.ndarray]) -> None:
        """A new session over the same model file with `initializers` in place of the file's tensors of those names
        (ORT's `add_initializer`, applied before graph optimization, so what ORT folds or fuses derives from them);
        added to those of earlier reloads. Captured CUDA graphs are dropped (the next run at a shape recaptures)."""
        import onnxruntime as ort

        self.initializers.update({n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                                  for n, a in initializers.items()})
        self.session = None  # the old session's memory goes before the new one is made
        self.session = self._open()
        self._graphs = {}

    def _output_buffers(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        axes = infer_axes(self.spec, inputs, self.vae_scale)
        return {t.name: torch.empty(t.concrete(axes), dtype=t.torch_dtype, device=self.device)
                for t in self.spec.outputs}

    def _bind(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]):
        binding = self.session.io_binding()
        dev_id = self.device.index or 0
        for (name, x), t in zip(inputs.items(), self.spec.inputs):
            binding.bind_input(name=name, device_type="cuda", device_id=dev_id, element_type=_NP[t.dtype],
                               shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        for (name, y), t in zip(outputs.items(), self.spec.outputs):
            binding.bind_output(name=name, device_type="cuda", device_id=dev_id, element_type=_NP[t.dtype],
                                shape=tuple(y.shape), buffer_ptr=y.data_ptr())
        return binding

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type != "cuda":
            feeds = {name: x.detach().cpu().numpy() for name, x in inputs.items()}
            outs = self.session.run([t.name for t in self.spec.outputs], feeds)
            return {t.name: torch.from_numpy(o) for t, o in zip(self.spec.outputs, outs)}
        if not self.cuda_graph:
            outputs = self._output_buffers(inputs)
            self.session.run_with_iobinding(self._bind(inputs, outputs), self._run_options())
            return outputs
        return self._run_graph(inputs)

    def _run_options(self):
        if not self.shrink_arena:
            return None
        import onnxruntime as ort

        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", shrink_config(self.device))
        return ro

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs captured so far: one per input shape seen with `cuda_graph=True`."""
        return len(self._graphs)

    def _run_graph(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import onnxruntime as ort

        shape_key = tuple(tuple(x.shape) for x in inputs.values())
        g = self._graphs.get(shape_key)
        if g is None:  # first call at this shape: static buffers, captured on this run
            static = {n: x.clone() for n, x in inputs.items()}
            outputs = self._output_buffers(static)
            g = self._graphs[shape_key] = _Graph(len(self._graphs), static, outputs, self._bind(static, outputs))
        for n, x in inputs.items():
            g.inputs[n].copy_(x)
        ro = ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(g.graph_id))
        self.session.run_with_iobinding(g.binding, ro)
        return {n: y.clone() for n, y in g.outputs.items()}  # the next replay overwrites the buffers


class OnnxRuntimeBackend(Backend):
    """ONNX models run by ONNX Runtime: the CPU EP, or the CUDA EP with IOBinding where onnxruntime-gpu is present."""

    name = NAME
    preference = {"cuda": 1, "cpu": 0}
    capture_note = ("an ONNX Runtime session binds its CUDA stream when it is created, while the runtime captures "
                    "its graphs on a stream of its own; ORT's own per-shape CUDA graphs (ort_unet_graphs) apply instead")

    def version(self) -> str:
        return version()

    def check_available(self, device: str) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendUnavailable("the onnxruntime package is not installed (pip install 'megafusion[onnx]')") \
                from None
        if device.startswith("cuda") and not cuda_available():
            raise BackendUnavailable("--device cuda with --backend onnxruntime needs onnxruntime-gpu; "
                                     "pass --device cpu or install onnxruntime-gpu")

    def check_request(self, precision: str, ort_optimize: str, device: str, dynamic: bool = False) -> None:
        from ..export.ort_optimize import ORT_OPTIMIZE_CHOICES

        super().check_request(precision, "none", device, dynamic)
        if ort_optimize not in ORT_OPTIMIZE_CHOICES:
            raise ValueError(f"unknown ORT optimization {ort_optimize!r}; choose one of "
                             f"{', '.join(ORT_OPTIMIZE_CHOICES)}")
        if ort_optimize == "cuda" and torch.device(device).type != "cuda":
            raise ValueError(f"ORT optimization 'cuda' adds ops only the CUDA EP runs (GroupNorm, NhwcConv, ...); "
                             f"engines for device {device!r} need 'cpu' or 'none'")

    def default_ort_optimize(self, device: str) -> str:
        return "cuda" if torch.device(device).type == "cuda" else "none"  # 2048 px needs fused attention there

    def rebuild_args(self, ort_optimize: str) -> list[str]:
        return ["--ort-optimize", ort_optimize]

    def export(self, how: NetworkExport, staging: Path, device: str):
        return how.onnx(Path(staging) / "model.onnx")

    def open_file(self, path: Path, spec: NetworkSpec, device: torch.device) -> OrtRunner:
        return OrtRunner(path, spec, 1, device)  # scale 1: the only such ORT engines are IF's, whose UNets see pixels

    def build(self, job: BuildJob, staging, log: Log) -> BuildOutput:
        from .onnx_build import export_model

        onnx_path = staging / "model.onnx"
        out = export_model(job, onnx_path, log)
        if job.check_load:  # on the engines' device: a CPU load of an fp16 SDXL UNet proves little and is slow
            # On CPU the check opens with basic optimizations: `all` would hold ~3.7x an fp16 model in RAM (about
            # 19 GB for the SDXL UNet, beside the bundle), past a 24 GB machine; sessions that run use `all`.
            level = "basic" if torch.device(job.device).type == "cpu" else "all"
            OrtRunner(onnx_path, job.requirement.spec, job.bundle.family.vae_scale, job.device, optimization=level)
        return out

    def open(self, entry, path, spec: NetworkSpec, ctx: OpenContext) -> OrtRunner:
        # The VAE runs a few times per generation with transients of tens of GB at 2048 px (fp32 mid-block
        # attention); each session's arena would keep its peak, so encoder and decoder give theirs back.
        return OrtRunner(path, spec, ctx.family.vae_scale, ctx.device,
                         cuda_graph=ctx.ort_unet_graphs and spec.network == UNET,
                         shrink_arena=spec.network in (VAE_DECODER, VAE_ENCODER),
                         conv_algo_search=ctx.ort_conv_algo_search)

    swap_note = ""

    def swap_weights(self, runner: OrtRunner, module: torch.nn.Module, prefix: str,
                     weights: dict[str, torch.Tensor]) -> int:
        """The session re-created from the same file with the changed initializers (`OrtRunner.reload`)."""
        found = initializer_names(runner, module, prefix, list(weights))
        arrays = {}
        for name, w in weights.items():
            init, dtype, transposed = found[name]
            t = w.detach().to("cpu", dtype)
            arrays[init] = (t.t() if transposed else t).contiguous().numpy()
        runner.reload(arrays)
        return len(arrays)


def initializer_names(runner: OrtRunner, module: torch.nn.Module, prefix: str,
                      names: list[str]) -> dict[str, tuple[str, torch.dtype, bool]]:
    """{weight name: (initializer name, its dtype, stored transposed)} for `module`'s weights in the runner's model.

    A weight kept by its own name (convolutions) is found by name; the TorchScript exporter stores a Linear's weight
    transposed under a name of its own (`onnx::MatMul_N`), found by content: the initializer whose bytes are the base
    weight's, transposed and cast. WeightSwapError names a weight no initializer holds alone (ORT's fusion packs
    Q, K and V into one tensor, for example): such a model serves its built weights only."""
    import hashlib

    import onnx
    from onnx import helper, numpy_helper

    cache: dict = runner.__dict__.setdefault("_initializer_names", {})
    missing = [n for n in names if n not in cache]
    if not missing:
        return {n: cache[n] for n in names}
    model = onnx.load(str(runner.path), load_external_data=False)
    inits = list(model.graph.initializer)

    def dtype_of(t) -> torch.dtype:
        return torch.from_numpy(np.empty(0, helper.tensor_dtype_to_np_dtype(t.data_type))).dtype

    by_name = {t.name: t for t in inits}
    wanted: dict[tuple, dict[bytes, list[str]]] = {}  # (shape, dtype) -> {digest of the bytes: weight names}
    for name in missing:
        base = module.get_parameter(name).detach()
        t = by_name.get(f"{prefix}.{name}")
        if t is not None and tuple(t.dims) == tuple(base.shape):
            cache[name] = (t.name, dtype_of(t), False)
        elif base.dim() == 2:
            for t in inits:
                if tuple(t.dims) == tuple(base.shape[::-1]):
                    dtype = dtype_of(t)
                    digest = hashlib.sha256(base.to("cpu", dtype).t().contiguous().numpy().tobytes()).digest()
                    wanted.setdefault((tuple(t.dims), dtype), {}).setdefault(digest, []).append(name)
                    break
    if wanted:
        folder = str(runner.path.parent)
        for t in inits:
            by_bytes = wanted.get((tuple(t.dims), dtype_of(t)))
            if not by_bytes:
                continue
            digest = hashlib.sha256(np.ascontiguousarray(numpy_helper.to_array(t, folder)).tobytes()).digest()
            hit = by_bytes.get(digest)
            if hit and len(hit) == 1 and hit[0] not in cache:
                cache[hit[0]] = (t.name, dtype_of(t), True)
    for name in missing:
        if name not in cache:
            raise WeightSwapError(f"{runner.path}: no initializer holds {prefix}.{name} alone (renamed, fused or "
                                  "folded when the model was exported or optimized), so the session cannot take "
                                  "new weights")
    return {n: cache[n] for n in names}


BACKEND = OnnxRuntimeBackend()
