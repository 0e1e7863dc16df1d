"""An AOTInductor package opened by libtorch's own loader (`torch._C._aoti.AOTIModelPackageLoader`), without
importing torch._inductor.

`torch._inductor.aoti_load_package` builds the same loader, with the same arguments, and wraps it in
`AOTICompiledModel`; but importing it imports Inductor, torch._dynamo and sympy, 3.2 s of a start here, which a
process that only runs built packages never uses. `PackageModel` is that wrapper's part we call: positional tensor
inputs, outputs unflattened by the package's own call spec, and its constants.
"""
from __future__ import annotations

import os

import torch
import torch.utils._pytree as pytree


class PackageModel:
    """A loaded package, called and updated as `AOTICompiledModel` is (`model(*tensors)`, `load_constants`,
    `get_constant_fqns`)."""

    def __init__(self, loader):
        self.loader = loader
        self._out_spec = pytree.treespec_loads(loader.get_call_spec()[1])

    def __call__(self, *args: torch.Tensor):
        if not all(isinstance(a, torch.Tensor) for a in args):
            raise TypeError("a package takes tensors only, in its input order")
        return pytree.tree_unflatten(self.loader.boxed_run(list(args)), self._out_spec)

    def load_constants(self, constants_map: dict[str, torch.Tensor], *, check_full_update: bool,
                       user_managed: bool = False) -> None:
        # use_inactive False: write the constants the model runs with, as AOTICompiledModel does
        self.loader.load_constants(constants_map, False, check_full_update, user_managed)

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def get_metadata(self) -> dict[str, str]:
        return self.loader.get_metadata()


def open_package(path: str | os.PathLike, run_single_threaded: bool, device_index: int) -> PackageModel:
    """The package's default model ("model"), as `torch._inductor.aoti_load_package(path, run_single_threaded,
    device_index)` loads it (one runner)."""
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(os.fspath(path), "model", run_single_threaded, 1,
                                                       device_index)
    except TypeError:  # a torch whose loader takes other arguments: its own wrapper knows them
        from torch._inductor import aoti_load_package

        return aoti_load_package(os.fspath(path), run_single_threaded=run_single_threaded, device_index=device_index)
    return PackageModel(loader)
