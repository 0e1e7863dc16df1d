"""Compiled functions kept across processes (engine/precompiled.py): traced once per call signature and module
state, saved with a sha256 record, loaded by a new call site without tracing; damaged files compiled again and
replaced. The `aot_eager` backend keeps these seconds long where torch can precompile with it (2.13; 2.11 takes
Inductor only); tests/engine/test_compile_cache.py runs Inductor across two processes."""
from __future__ import annotations

import functools

import pytest
import torch

from megafusion.engine.precompiled import (Precompiled, aot_compile_enabled, call_module, call_signature,
                                           portable_guards, precompile_missing)

pytestmark = pytest.mark.skipif(bool(precompile_missing()), reason=precompile_missing() or "")


@functools.cache
def _backend() -> str:
    """aot_eager where this torch precompiles with it (seconds), else Inductor."""
    with aot_compile_enabled():
        f = torch.compile(call_module, fullgraph=True, backend="aot_eager")
    try:
        f.aot_compile(((torch.nn.Identity(), torch.ones(2)), {}))
        return "aot_eager"
    except Exception:
        return "inductor"


class Dilated(torch.nn.Module):
    """A conv whose dilation (a Python attribute Dynamo guards on) changes the traced code, as the UNet's mid block."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, scale: float = 1.0):
        return self.conv(x) * scale


def _site(module, folder=None) -> Precompiled:
    compile = lambda fn: torch.compile(fn, fullgraph=True, dynamic=False, backend=_backend(),  # noqa: E731
                                       options={"guard_filter_fn": portable_guards})
    site = Precompiled("net", call_module, module, compile, lambda: module.conv.dilation)
    site.attach(folder)
    return site


def _dilate(module, d: int) -> None:
    module.conv.dilation, module.conv.padding = (d, d), (d, d)


def test_a_new_call_site_loads_instead_of_tracing(tmp_path):
    torch.manual_seed(0)
    module, x = Dilated().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = _site(module, tmp_path)
        got = first(x, scale=0.5)
        assert torch.allclose(got, module(x, scale=0.5), atol=1e-5)  # Inductor (2.11) is not bit-equal to eager
        assert first.counters == {"traced": 1, "loaded": 0, "saved": 1, "rejected": 0}
        assert len(list(tmp_path.glob("net-*.bin"))) == 1 and len(list(tmp_path.glob("net-*.sha256"))) == 1

        second = _site(module, tmp_path)  # as a new process would: nothing traced in this object
        assert torch.equal(second(x, scale=0.5), got)  # the same compiled code
        x2 = torch.randn(1, 3, 8, 8)  # same signature, other values: the same function
        assert torch.allclose(second(x2, scale=0.5), module(x2, scale=0.5), atol=1e-5)
        assert second.counters == {"traced": 0, "loaded": 1, "saved": 0, "rejected": 0}

        _dilate(module, 2)  # another module state: another function, traced and saved beside the first
        assert torch.allclose(second(x, scale=0.5), module(x, scale=0.5), atol=1e-5)
        assert second.counters["traced"] == 1 and len(list(tmp_path.glob("net-*.bin"))) == 2
        second(x, scale=2.0)  # a non-tensor argument is part of the signature too
        assert second.counters["traced"] == 2


def test_a_damaged_file_is_compiled_again_and_replaced(tmp_path):
    module, x = Dilated().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        _site(module, tmp_path)(x)
        (data,) = tmp_path.glob("net-*.bin")
        data.write_bytes(data.read_bytes()[:-10] + b"0123456789")
        again = _site(module, tmp_path)
        assert torch.allclose(again(x), module(x), atol=1e-5)
        assert again.counters == {"traced": 1, "loaded": 0, "saved": 1, "rejected": 1}
        fresh = _site(module, tmp_path)  # the replaced file loads
        assert torch.allclose(fresh(x), module(x), atol=1e-5) and fresh.counters["loaded"] == 1


def test_without_a_folder_it_is_plain_torch_compile(tmp_path):
    module, x = Dilated().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        site = _site(module)
        assert torch.allclose(site(x), module(x), atol=1e-5)
    assert site.counters == {"traced": 0, "loaded": 0, "saved": 0, "rejected": 0} and not list(tmp_path.iterdir())


def test_signature_covers_shape_stride_dtype_and_state():
    x = torch.randn(1, 3, 8, 8)
    sigs = {call_signature((x,), {}), call_signature((x.to(memory_format=torch.channels_last),), {}),
            call_signature((x.half(),), {}), call_signature((torch.randn(1, 3, 8, 16),), {}),
            call_signature((x,), {}, state=(2, 2)), call_signature((x,), {"scale": 2.0})}
    assert len(sigs) == 6
    assert call_signature((x,), {}) == call_signature((torch.randn(1, 3, 8, 8),), {})  # values do not count


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_functions_load_and_replay_in_a_graph(tmp_path):
    """On CUDA with Inductor (Triton kernels), as the compiled path runs: a loaded function gives the traced one's
    output and is captured and replayed inside a CUDA graph."""
    from megafusion.engine.torch_fast import FastOptions, compile_with

    module = Dilated().cuda().eval()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    compile = lambda fn: compile_with(fn, FastOptions(), portable_guards)  # noqa: E731
    with torch.no_grad():
        first = Precompiled("net", call_module, module, compile, lambda: module.conv.dilation)
        first.attach(tmp_path)
        got = first(x)
        again = Precompiled("net", call_module, module, compile, lambda: module.conv.dilation)
        again.attach(tmp_path)
        assert torch.allclose(again(x), got, atol=1e-5)
        assert again.counters["loaded"] == 1 and again.counters["traced"] == 0
        static_x, graph = x.clone(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = again(static_x)
        static_x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(out, module(static_x), atol=1e-3)
