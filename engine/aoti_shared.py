"""Weights of `--weights-apart` packages, read once per process and device and shared by every package that
reads the same file (export/aoti_weights.py).

SDXL's standard and dilated UNets are the same weights compiled for two shapes: their entries' weight files
have the same bytes, so the same sha256 (the manifest's, verified before opening). Keyed by it, the second
package gets the tensors the first one read: half the bytes read at start-up and one copy on the device
(4.9 GB fewer for SDXL fp16). The tensors live as long as a runner holds them.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path

import torch

from ..export.aoti_weights import read_weights
from .cache import EngineError


class SharedWeights:
    """One weight file's tensors on one device, by their original names."""

    def __init__(self, tensors: dict[str, torch.Tensor], sha256: str):
        self.tensors, self.sha256 = tensors, sha256


_OPEN: "weakref.WeakValueDictionary[tuple[str, str], SharedWeights]" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()
reads = 0
"""Weight files read by this process (tests count it: two packages of one file read it once)."""


def shared_weights(path: str | Path, sha256: str, device: torch.device) -> SharedWeights:
    """The tensors of the verified weight file `path` (whose sha256 is `sha256`) on `device`: those already read
    for a file of the same sha256 while a runner still holds them, else read now."""
    global reads
    key = (sha256, str(device))
    with _LOCK:
        found = _OPEN.get(key)
        if found is None:
            try:
                found = SharedWeights(read_weights(path, device), sha256)
            except ValueError as e:
                raise EngineError(f"{e}; rebuild the entry with mf-build-engines --weights-apart --force") from None
            _OPEN[key] = found
            reads += 1
        return found
