"""TensorRT: engine build from ONNX (one optimization profile per plan stage) and a runner.

Written to TensorRT 10's documented Python API (Builder, OnnxParser, BuilderConfig, timing cache,
IExecutionContext.execute_async_v3). `tensorrt` is imported only inside the functions that need it; the
profile computation (`optimization_profiles`, `select_profile`) is pure and tested without it.
TensorRT was NOT exercised in this repository's CI: the build and the runner are unverified.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.specs import NetworkSpec, ShapeProfile
from .backend import Backend, BackendUnavailable, BuildJob, BuildOutput, Log, OpenContext
from .cache import device_name

NAME = "tensorrt"

ProfileShapes = tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]


class ProfileError(ValueError):
    """Profiles that do not fit the spec, or a call no profile serves."""


def version() -> str:
    import tensorrt

    return tensorrt.__version__


def optimization_profiles(spec: NetworkSpec, profiles: tuple[ShapeProfile, ...]) -> list[ProfileShapes]:
    """Per profile, (input, min, opt, max) for every input of `spec`, checked: fixed dims as the spec says,
    min <= opt <= max, every input present. What `IOptimizationProfile.set_shape` receives, in order."""
    if not profiles:
        raise ProfileError(f"{spec.name}: no shape profiles")
    out = []
    for p in profiles:
        by_name = {n: (lo, opt, hi) for n, lo, opt, hi in p.shapes}
        rows = []
        for t in spec.inputs:
            if t.name not in by_name:
                raise ProfileError(f"{spec.name}: stage {p.stage} profile lacks input {t.name}")
            lo, opt, hi = by_name[t.name]
            if not len(lo) == len(opt) == len(hi) == len(t.shape):
                raise ProfileError(f"{spec.name}: {t.name} profile rank differs from {t.shape}")
            for i, d in enumerate(t.shape):
                if not 1 <= lo[i] <= opt[i] <= hi[i]:
                    raise ProfileError(f"{spec.name}: {t.name} axis {i}: need 1 <= min <= opt <= max, "
                                       f"got {lo[i]}, {opt[i]}, {hi[i]}")
                if isinstance(d, int) and not lo[i] == hi[i] == d:
                    raise ProfileError(f"{spec.name}: {t.name} axis {i} is fixed at {d}, profile says {lo[i]}..{hi[i]}")
            rows.append((t.name, tuple(lo), tuple(opt), tuple(hi)))
        out.append(tuple(rows))
    return out


def select_profile(profiles: list[ProfileShapes], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose [min, max] holds every input shape of a call."""
    for i, rows in enumerate(profiles):
        if all(len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi))
               for n, lo, _, hi in rows):
            return i
    raise ProfileError(f"no optimization profile serves shapes {shapes}")


def build_engine(onnx_path: str | os.PathLike, spec: NetworkSpec, profiles: tuple[ShapeProfile, ...],
                 fp16: bool, timing_cache: Path | None = None, workspace_bytes: int | None = None) -> bytes:
    """A serialized engine for the ONNX model (external data is read from beside it)."""
    import tensorrt as trt

    rows = optimization_profiles(spec, profiles)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in rows:
        profile = builder.create_optimization_profile()
        for name, lo, opt, hi in shapes:
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    if timing_cache is not None:  # tactics timed here speed up the next build (other shapes, variants)
        tmp = timing_cache.with_name(f".{timing_cache.name}.{os.getpid()}.tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_cache)
    return bytes(serialized)


class TrtRunner:
    """A deserialized engine and one execution context; runs on the current torch CUDA stream."""

    def __init__(self, engine_path: str | os.PathLike, spec: NetworkSpec, profiles: tuple[ShapeProfile, ...],
                 device: torch.device | str = "cuda"):
        import tensorrt as trt

        self.spec, self.device = spec, torch.device(device)
        self.rows = optimization_profiles(spec, profiles)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path} (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        self._profile = -1
        # Enqueue on the current stream is capturable per TensorRT's documentation (profile switches happen on
        # a shape's first call, which the runtime makes before capturing); unverified here.
        self.capturable = True

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        idx = select_profile(self.rows, {n: tuple(x.shape) for n, x in inputs.items()})
        if idx != self._profile:
            self.context.set_optimization_profile_async(idx, stream)
            self._profile = idx
        for name, x in inputs.items():
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = {}
        for t in self.spec.outputs:
            y = torch.empty(tuple(self.context.get_tensor_shape(t.name)), dtype=t.torch_dtype, device=self.device)
            self.context.set_tensor_address(t.name, y.data_ptr())
            outputs[t.name] = y
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execution of {self.spec.name} failed")
        return outputs


class TensorRTBackend(Backend):
    """Serialized TensorRT engines, one optimization profile per plan stage shape (unverified here)."""

    name = NAME
    swap_note = "engines are built without TensorRT's refit flag, so their weights cannot be replaced"
    preference = {"cuda": 0}

    def version(self) -> str:
        return version()

    def check_available(self, device: str) -> None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise BackendUnavailable("the tensorrt package is not installed "
                                     "(pip install 'megafusion[tensorrt]' on a CUDA machine)") from None
        if not device.startswith("cuda"):
            raise BackendUnavailable("--backend tensorrt needs a CUDA device")

    def build(self, job: BuildJob, staging: Path, log: Log) -> BuildOutput:
        from .onnx_build import export_model

        out = export_model(job, staging / "model.onnx", log)
        r = job.requirement
        timing_cache = job.output / f"timing-{device_name(job.device).replace(' ', '_')}.cache"
        plan = build_engine(staging / "model.onnx", r.spec, r.profiles, r.spec.precision == "fp16", timing_cache)
        (staging / "engine.plan").write_bytes(plan)
        for f in out.exported.files:  # the engine is self-contained; the ONNX (GBs for SDXL) is not kept
            f.unlink()
        return out

    def open(self, entry, path, spec: NetworkSpec, ctx: OpenContext) -> TrtRunner:
        return TrtRunner(path, spec, entry.key.profiles, ctx.device)


BACKEND = TensorRTBackend()
