"""Weights kept apart from an AOTInductor package (`mf-build-engines --weights-apart`).

A package compiled with `aot_inductor.package_constants_in_so=False` holds code only; its constants come from
`weights.safetensors` beside it, by their original names (`unet.conv_in.weight`), and are handed to the package
with `load_constants(..., user_managed=True)`: the package reads those very tensors, so packages of the same
weights (SDXL's standard and dilated UNets) can share one copy.

Why: loading a package extracts the whole `.pt2` to a temporary folder and copies the constants out of its
shared library on every open (SDXL's UNet: 4.9 GB written and read again per package, twice for the two UNets,
and two copies on the GPU). safetensors holds contiguous tensors only, so a tensor exported in another memory
layout (channels_last convolution weights) is stored flat in its memory order with its shape and strides in the
metadata: read back, it has the strides the package was compiled for.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

WEIGHTS_FILE = "weights.safetensors"
"""The file of an entry built with --weights-apart."""
_META_KEY, FORMAT = "megafusion.aoti_weights", 1
"""The one metadata entry: JSON {"format": FORMAT, "layout": {name: [shape, strides]}} for tensors whose strides
are not the contiguous ones of their shape. One entry, because safetensors writes several in no fixed order (the
same tensors would then give other bytes); a file without it, or of another format, is refused, never read as
tensors of the wrong shape."""


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))


def _dense(t: torch.Tensor) -> bool:
    """Its elements fill the span they address, each once (what a parameter in any memory format is)."""
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.numel() > 0 and span == t.numel()


def write_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> int:
    """Writes `tensors` (name -> tensor as the package reads it) to the safetensors file `path`; returns the bytes
    of tensor data written. The bytes depend on the tensors only, so two packages of the same weights write the
    same file (same sha256)."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    layout: dict[str, list[list[int]]] = {}
    for name, t in sorted(tensors.items()):
        t = t.detach()
        if t.stride() != _contiguous_strides(tuple(t.shape)) and _dense(t):
            # Stored flat in memory order (largest stride first) and read back through the recorded strides,
            # which address the same elements (a size-1 dimension's stride addresses nothing).
            layout[name] = [list(t.shape), list(t.stride())]
            t = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d))).reshape(-1)
        out[name] = t.contiguous().to("cpu")  # owns its storage (safetensors refuses shared ones)
    save_file(out, str(path), metadata={_META_KEY: json.dumps({"format": FORMAT, "layout": layout}, sort_keys=True)})
    return sum(t.numel() * t.element_size() for t in out.values())


def read_weights(path: str | os.PathLike, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors of a file `write_weights` wrote, on `device`, each with the shape and strides it was written
    with; ValueError naming the file if it is not of this format's version."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(path)), framework="pt", device=str(torch.device(device))) as f:
        try:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            found = meta["format"]
        except (KeyError, TypeError, ValueError):
            found = None
        if found != FORMAT:
            raise ValueError(f"{path}: not a megafusion weight file of format {FORMAT} (found {found!r})")
        layout = meta.get("layout", {})
        for name in f.keys():
            t = f.get_tensor(name)
            if name in layout:
                shape, strides = layout[name]
                t = t.as_strided(shape, strides)
            out[name] = t
    return out


def program_weights(ep: "torch.export.ExportedProgram") -> dict[str, torch.Tensor]:
    """Every tensor an exported program lifts as a constant (parameters, buffers, tensor constants), by the name
    the compiled package knows it by (its original FQN)."""
    found = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
    return {name: t for name, t in found.items()}
