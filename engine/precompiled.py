"""Compiled functions kept across processes (#15 item 3, the compiled path's warm start).

Inductor's caches (engine/compile_cache.py) spare a new process the kernel builds, but Dynamo still traces every
module again: on the H200 that was 28-30 s of a 78-84 s warm start for SDXL 2048, plus 9 s of backend and 4.5 s
of guards (benchmarks/RESULTS.md, thirteenth session). torch's precompile (`torch.compile(fn).aot_compile`, saved
with `save_compiled_function`, read back by `torch.compiler.load_compiled_function`, experimental in torch 2.11
and 2.13) keeps the traced and compiled function itself: a later process calls it without tracing.

`Precompiled` wraps one call site (the UNet, the VAE decode, the VAE encode). The module is the first argument of
the compiled function, so its parameters are graph inputs and no weight goes into a file. Each distinct call
(the shapes, strides and dtypes of its tensors, its other arguments, the module's `state`) is traced once, saved
as `<name>-<signature>.bin` in the compile-cache entry's folder with a `.sha256` record, and loaded by later
processes on their first call of that signature. A loaded function runs only after its own guards accept the
call; a file that is damaged, foreign or rejected is compiled again and replaced (two processes writing one file
at once can leave a record of the other's data: the next reader rejects it and writes it again). Where torch lacks
precompile, the call site is plain `torch.compile` (Dynamo traces in every process) and `missing` says why.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .cache import atomic_write

log = logging.getLogger(__name__)


@functools.cache
def precompile_missing() -> str:
    """'' if this torch can save and load compiled functions, else what is missing."""
    if not hasattr(torch.compiler, "load_compiled_function"):
        return f"torch {torch.__version__} has no torch.compiler.load_compiled_function"
    with aot_compile_enabled():
        if not hasattr(torch.compile(call_module, fullgraph=True), "aot_compile"):  # wraps only; nothing traced
            return f"torch {torch.__version__} has no aot_compile on compiled functions"
    return ""


def aot_compile_enabled():
    """torch 2.11 gives compiled functions their `aot_compile` only under Dynamo's `enable_aot_compile` (2.13 always
    does); the flag is read when torch.compile wraps a function, so it is set around that call only."""
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


def call_signature(args: tuple, kwargs: dict, state: object = None) -> str:
    """What static-shape compiled code depends on in one call: every tensor's shape, stride, dtype and device,
    every other leaf's type and value, and the module's `state`; as a short hex digest."""
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    parts = [str(spec), repr(state)]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            parts.append(f"T{tuple(x.shape)}{x.stride()}{x.dtype}{x.device}")
        else:
            parts.append(f"{type(x).__name__}:{x!r}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def call_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The UNet call site: the module is an argument, so its weights are inputs of the compiled graph."""
    return module(*args, **kwargs)


def _process_bound() -> frozenset[str]:
    from torch._dynamo.guards import CheckFunctionManager

    return frozenset(getattr(CheckFunctionManager, "UNSUPPORTED_SERIALIZATION_GUARD_TYPES", ()) or (
        "DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH", "CLOSURE_MATCH",
        "WEAKREF_ALIVE"))


def portable_guards(entries) -> list[bool]:
    """A Dynamo `guard_filter_fn`: drops the guards that no file can carry to another process, those on object
    identity (diffusers' Attention reads its processor's signature: an identity guard on a code object), on dict
    versions and on globals. Each call site always holds the same classes and functions; what changes the traced code
    (shapes, strides, dtypes, attribute values such as the dilation, grad mode) keeps its guards."""
    bound = _process_bound()  # as torch's own default for precompile, and the derived types too
    return [not (e.is_global or e.guard_type in bound or bound.intersection(e.derived_guard_types or ()))
            for e in entries]


class Precompiled:
    """One compiled call site over `module`: `self(*args, **kwargs)` runs `fn(module, *args, **kwargs)` compiled.

    `compile` turns `fn` into a torch.compile wrapper (fullgraph, static shapes); `state` returns what of the
    module changes the traced code between calls (the UNet's mid-block dilation). Counters: `traced` (compiled in
    this process), `loaded` (read from the folder), `saved`, `rejected` (files not usable)."""

    def __init__(self, name: str, fn: Callable, module: torch.nn.Module, compile: Callable[[Callable], Callable],
                 state: Callable[[], object] = lambda: None):
        self.name, self.module, self.state = name, module, state
        with aot_compile_enabled():
            self.compiled = compile(fn)
        self.folder: Path | None = None
        self.missing = precompile_missing()
        self.table: dict[str, Any] = {}
        self.counters = {"traced": 0, "loaded": 0, "saved": 0, "rejected": 0}

    def attach(self, folder: str | os.PathLike | None) -> None:
        """Keep and look up compiled functions in `folder` (None: plain torch.compile, nothing kept)."""
        self.folder = None if folder is None else Path(folder)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.folder is None or self.missing:
            return self.compiled(self.module, *args, **kwargs)
        full = (self.module, *args)
        sig = call_signature(args, kwargs, self.state())
        fn = self.table.get(sig)
        if fn is None:
            fn = self._load(sig, full, kwargs) or self._trace(sig, full, kwargs)
            self.table[sig] = fn
        return fn(*full, **kwargs)

    def _paths(self, sig: str) -> tuple[Path, Path]:
        stem = self.folder / f"{self.name}-{sig}"
        return stem.with_suffix(".bin"), stem.with_suffix(".sha256")

    def _load(self, sig: str, args: tuple, kwargs: dict):
        data_path, sum_path = self._paths(sig)
        try:
            data, want = data_path.read_bytes(), sum_path.read_text().strip()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != want:
            self.counters["rejected"] += 1
            return None
        try:
            fn = torch.compiler.load_compiled_function(io.BytesIO(data))
            if not fn.guard_check(*args, **kwargs):  # saved for another module state or torch setting
                raise RuntimeError("guards reject this call")
        except Exception as exc:  # another torch's format, a changed module: compile again, replace the file
            self.counters["rejected"] += 1
            log.warning("compile cache: %s not usable (%s: %s); compiling", data_path.name, type(exc).__name__,
                        str(exc)[:160])
            return None
        self.counters["loaded"] += 1
        return fn

    def _trace(self, sig: str, args: tuple, kwargs: dict):
        try:
            fn = self.compiled.aot_compile((args, kwargs))
        except Exception as exc:  # a guard or an object precompile cannot keep: trace as torch.compile does
            self.missing = f"precompile failed: {type(exc).__name__}: {str(exc)[:200]}"
            log.warning("compile cache: %s not kept (%s)", self.name, self.missing)
            return lambda *a, **k: self.compiled(*a, **k)
        self.counters["traced"] += 1
        data_path, sum_path = self._paths(sig)
        self.folder.mkdir(parents=True, exist_ok=True)
        data = type(fn).serialize(fn).serialized_data  # what save_compiled_function writes (2.11: not atomically)
        atomic_write(data_path, data)  # the data first: a record never names a file that is not complete
        atomic_write(sum_path, hashlib.sha256(data).hexdigest().encode())
        self.counters["saved"] += 1
        return fn


def site_counters(sites) -> dict[str, int]:
    """traced / loaded / saved / rejected, summed over `Precompiled` call sites (what `compiled functions: ...`
    prints)."""
    total = {"traced": 0, "loaded": 0, "saved": 0, "rejected": 0}
    for site in sites:
        for k, v in site.counters.items():
            total[k] += v
    return total
