"""engine/aoti_loader.py: a package opened by libtorch's loader directly runs, and takes constants, exactly as
`torch._inductor.aoti_load_package`'s model does, and opening it imports no torch._inductor or torch._dynamo."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megafusion.engine.aoti_loader import open_package

pytestmark = pytest.mark.slow  # one AOTInductor compile, about 25 s here


class Two(torch.nn.Module):
    """Two outputs (the VAE encoder's and the pooled text encoder's shape of result), a weight to swap."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x, y):
        h = self.proj(x)
        return torch.relu(h) + y, h.sum(dim=-1)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    module = Two().eval()
    inputs = (torch.randn(2, 8), torch.randn(2, 4))
    path = tmp_path_factory.mktemp("aoti-loader") / "model.pt2"
    ep = torch.export.export(module, inputs)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    return path, module, inputs


def test_runs_and_swaps_constants_as_torch_loader_does(package):
    path, module, inputs = package
    ours = open_package(path, run_single_threaded=True, device_index=-1)
    theirs = torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=-1)
    got, want = ours(*inputs), theirs(*inputs)
    assert isinstance(got, type(want)) and len(got) == len(want) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch.no_grad():
        assert torch.allclose(got[0], module(*inputs)[0], atol=1e-5)

    fqns = ours.get_constant_fqns()
    assert sorted(fqns) == sorted(theirs.get_constant_fqns()) and "proj.weight" in fqns  # (the bias may fold)
    params = dict(module.named_parameters())
    new = {n: torch.randn_like(params[n]) for n in fqns}
    ours.load_constants(new, check_full_update=True)
    theirs.load_constants(new, check_full_update=True)
    swapped = ours(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(swapped, theirs(*inputs)))
    assert not torch.equal(swapped[1], got[1])  # the new weights are the ones that ran
    with pytest.raises(TypeError, match="tensors only"):
        ours(inputs[0], 3)


def test_opening_a_package_imports_no_inductor(package):
    code = ("import sys; from megafusion.engine.aoti_backend import load_package; import torch; "
            f"m = load_package({str(package[0])!r}, torch.device('cpu')); m(torch.ones(2, 8), torch.ones(2, 4)); "
            "print(sorted(n for n in sys.modules if n.startswith(('torch._inductor', 'torch._dynamo', 'sympy'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.gpu
def test_a_cuda_package_runs_as_torch_loads_it_and_inside_a_cuda_graph(tmp_path):
    """On CUDA the runtime replays packages inside its CUDA graphs (runtime/graphs.py): loaded single-threaded, a
    package run captures, and its replays follow new inputs written in place."""
    from megafusion.engine.aoti_backend import load_package

    torch.manual_seed(0)
    dev = torch.device("cuda")
    module = Two().to(dev).eval()
    inputs = (torch.randn(2, 8, device=dev), torch.randn(2, 4, device=dev))
    path = tmp_path / "model.pt2"
    torch._inductor.aoti_compile_and_package(torch.export.export(module, inputs), package_path=str(path))
    ours = load_package(path, dev)
    theirs = torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=dev.index or 0)
    assert isinstance(ours, type(open_package(path, True, 0)))
    assert all(torch.equal(a, b) for a, b in zip(ours(*inputs), theirs(*inputs)))

    static = tuple(t.clone() for t in inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ours(*static)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ours(*static)
    fresh = (torch.randn(2, 8, device=dev), torch.randn(2, 4, device=dev))
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(out, theirs(*fresh)))
