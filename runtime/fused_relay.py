"""Fused pixel relay on CUDA: clamp -> bicubic -> clamp -> cast in one kernel (runtime/kernels/relay_bicubic.cu).

The source is compiled with NVRTC (cuda-python) for the current device on first use, the cubin cached on disk,
loaded with the driver API once per device and launched on torch's current stream. Without CUDA tensors or
without cuda-python, `relay_resize` runs the torch reference (clamp, interpolate, clamp, cast) instead.
Importing this module compiles and loads nothing.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

KERNEL_FILE = "relay_bicubic.cu"
BLOCK = 128  # threads along the output row; must match kBlock in the .cu host launcher
_MAX_GRID_YZ = 65535
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_OPTIONS = ("--std=c++17",)  # no fast-math: the weights must round as torch's do
_DISABLE_ENV = "MEGAFUSION_RELAY_KERNEL"  # "0" forces the torch path (A/B comparisons, debugging)


def entry_name(in_dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    """Unmangled name of the kernel for one dtype pair."""
    return f"mf_relay_bicubic_{_DTYPE_NAMES[in_dtype]}_{_DTYPE_NAMES[out_dtype]}"


def entry_names() -> list[str]:
    return [entry_name(i, o) for i in _DTYPE_NAMES for o in _DTYPE_NAMES]


def kernel_source() -> str:
    return resources.files("megafusion.runtime").joinpath("kernels", KERNEL_FILE).read_text()


def cache_dir() -> Path:
    root = os.environ.get("MEGAFUSION_CACHE")
    return Path(root) / "kernels" if root else Path.home() / ".cache" / "megafusion" / "kernels"


def torch_relay_resize(image: torch.Tensor, height: int, width: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The reference and fallback: what the kernel fuses."""
    up = F.interpolate(image.clamp(-1.0, 1.0), size=(height, width), mode="bicubic", align_corners=False)
    return up.clamp(-1.0, 1.0).to(out_dtype)


# ----------------------------------------------------------------------------------------------- NVRTC
def _check(result: Any, what: str) -> Any:
    """cuda-python returns (err, *values); raise on any non-success code, return the values."""
    from cuda.bindings import driver, nvrtc

    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if isinstance(err, nvrtc.nvrtcResult) and err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {nvrtc.nvrtcGetErrorString(err)[1].decode()} ({err.name})")
    if isinstance(err, driver.CUresult) and err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {msg.decode() if msg else ''} ({err.name})")
    return values[0] if len(values) == 1 else values


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    return tuple(_check(nvrtc.nvrtcVersion(), "nvrtcVersion"))  # type: ignore[return-value]


def _target(arch: int) -> tuple[str, bool]:
    """(--gpu-architecture value, is_cubin): SASS when NVRTC knows the arch, else the newest PTX it can make
    below it (the driver JITs that; covers GPUs newer than the installed NVRTC)."""
    from cuda.bindings import nvrtc

    supported = list(_check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))
    if arch in supported:
        return f"sm_{arch}", True
    older = [a for a in supported if a <= arch]
    if not older:
        raise RuntimeError(f"NVRTC {nvrtc_version()} cannot target sm_{arch} (supports {supported})")
    return f"compute_{max(older)}", False


def compile_source(source: str, arch: int, options: tuple[str, ...] = _OPTIONS, name: str = KERNEL_FILE) -> bytes:
    """NVRTC-compile `source` for compute capability `arch` (e.g. 90): cubin bytes, or PTX for unknown archs.
    Raises with the compile log on errors. No GPU needed."""
    from cuda.bindings import nvrtc

    target, is_cubin = _target(arch)
    opts = [o.encode() for o in (f"--gpu-architecture={target}", *options)]
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            _check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise RuntimeError(f"NVRTC failed to compile {name} for {target} ({err.name}):\n"
                               f"{log.decode(errors='replace').rstrip(chr(0)).strip()}")
        get_size, get = (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if is_cubin else \
            (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
        image = b" " * _check(get_size(prog), "nvrtcGet image size")
        _check(get(prog, image), "nvrtcGet image")
        return image
    finally:
        _check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")


def cached_binary(arch: int, source: str | None = None, options: tuple[str, ...] = _OPTIONS) -> bytes:
    """compile_source through the on-disk cache (key: source, options, arch, NVRTC version)."""
    source = kernel_source() if source is None else source
    key = hashlib.sha256("\0".join([source, *options, str(arch), repr(nvrtc_version())]).encode()).hexdigest()
    path = cache_dir() / f"relay_bicubic-sm{arch}-{key[:24]}.bin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    image = compile_source(source, arch, options)
    tmp = None
    try:  # atomic: concurrent processes never see a half-written file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(image)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs a recompile next time
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return image


# --------------------------------------------------------------------------------------- driver + launch
@dataclass
class _Loaded:
    context: Any  # the device's primary context: torch's, and the one the module lives in
    module: Any
    functions: dict[str, Any] = field(default_factory=dict)


class _RelayKernels:
    """Per-process state: one loaded module per device, in that device's primary context (torch's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_device: dict[int, _Loaded] = {}

    def load(self, device: int) -> _Loaded:
        from cuda.bindings import driver

        loaded = self._by_device.get(device)
        if loaded is not None:
            return loaded
        with self._lock, torch.cuda.device(device):  # the guard keeps the thread's current device as it was
            if device not in self._by_device:
                major, minor = torch.cuda.get_device_capability(device)
                image = cached_binary(major * 10 + minor)
                _check(driver.cuInit(0), "cuInit")
                # Retained for the process's life, like torch's own reference: the module must outlive use.
                context = _check(driver.cuDevicePrimaryCtxRetain(_check(driver.cuDeviceGet(device), "cuDeviceGet")),
                                 "cuDevicePrimaryCtxRetain")
                _check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
                module = _check(driver.cuModuleLoadData(image), "cuModuleLoadData")
                functions = {name: _check(driver.cuModuleGetFunction(module, name.encode()),
                                          f"cuModuleGetFunction({name})") for name in entry_names()}
                self._by_device[device] = _Loaded(context, module, functions)
            return self._by_device[device]

    def launch(self, image: torch.Tensor, out: torch.Tensor) -> None:
        from cuda.bindings import driver

        device = image.device.index if image.device.index is not None else torch.cuda.current_device()
        loaded = self.load(device)
        func = loaded.functions[entry_name(image.dtype, out.dtype)]
        n, c, h, w = image.shape
        h2, w2 = out.shape[-2:]
        planes = n * c
        if planes == 0 or out.numel() == 0:
            return
        if planes > _MAX_GRID_YZ or h2 > _MAX_GRID_YZ:
            raise ValueError(f"relay kernel grid limit: N*C={planes} and out height {h2} must be <= {_MAX_GRID_YZ}")
        params = ((image.data_ptr(), out.data_ptr(), h, w, h2, w2),
                  (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int))
        with torch.cuda.device(device):
            current = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
            if int(current) != int(loaded.context):  # a fresh thread may have no current context yet
                _check(driver.cuCtxSetCurrent(loaded.context), "cuCtxSetCurrent")
            stream = driver.CUstream(torch.cuda.current_stream(device).cuda_stream)
            _check(driver.cuLaunchKernel(func, (w2 + BLOCK - 1) // BLOCK, h2, planes, BLOCK, 1, 1, 0, stream,
                                         params, 0), "cuLaunchKernel")


@functools.cache
def _kernels() -> _RelayKernels:
    return _RelayKernels()


@functools.cache
def nvrtc_available() -> bool:
    try:
        from cuda.bindings import driver, nvrtc  # noqa: F401

        nvrtc_version()
    except Exception:  # missing wheel or missing libnvrtc: both mean "use torch"
        return False
    return True


def kernel_supported(image: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether relay_resize will run the fused kernel for these arguments."""
    return (image.is_cuda and image.dim() == 4 and image.dtype in _DTYPE_NAMES and out_dtype in _DTYPE_NAMES
            and os.environ.get(_DISABLE_ENV, "1") != "0" and nvrtc_available())


def load(device: torch.device | int | None = None) -> None:
    """Compile (or read from cache) and load the kernel now, e.g. before CUDA-graph capture."""
    index = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    _kernels().load(index.index if index.index is not None else torch.cuda.current_device())


def relay_resize(image: torch.Tensor, height: int, width: int, out_dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """clamp(-1, 1) -> bicubic to (height, width) (torch's align_corners=False) -> clamp(-1, 1) -> out_dtype.

    Fused kernel for CUDA tensors when cuda-python is usable, torch otherwise. `out` (N, C, height, width)
    of `out_dtype`, contiguous, on image's device, receives the result if given (static buffers)."""
    if not kernel_supported(image, out_dtype):
        result = torch_relay_resize(image, height, width, out_dtype)
        return out.copy_(result) if out is not None else result
    shape = (*image.shape[:2], height, width)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=image.device)
    elif tuple(out.shape) != shape or out.dtype != out_dtype or out.device != image.device or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {shape} {out_dtype} on {image.device}; got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    _kernels().launch(image.contiguous(), out)
    return out
