"""Weights fingerprints: what an engine key's `weights` field says, computed from where the weights came from
rather than from the tensors, so that a start checks its engines without reading (or building) the weights.

Scheme 2 (`WEIGHTS_SCHEME`), one string per network, `mf2:<kind>:<sha256>`:
- `files`: a component of a local diffusers folder, over every file in its subfolder (config and weights), each
  file's sha256 remembered by `FileHashes` (a second start reads none).
- `random`: `build_random`'s weights, over the recipe that determines them (`core.loading.random_origin`: recipe
  version, family, class and config, seed, init device and dtype, library versions); nothing is materialised.
- `tensors`: any other module (a hub id's download, weights changed in place since loading such as a fused
  LoRA, an SD3.5 ControlNet that shares the transformer's patch embedding), over every tensor as scheme 1 hashed
  them (`cache.weights_fingerprint`).
- `lora`: a base fingerprint with LoRA files fused in at scales (`lora_fingerprint`), for code that knows which.
A ControlNet read from a local folder is `files` over that folder (`loaded_fingerprint`), so mf-serve checks its
engines before any replica loads it.
Scheme 1 was the bare tensor hash: entries built with it are refused as stale, naming the rebuild command.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from ..core.loading import ModelBundle, WeightsOrigin, module_origin
from .cache import EngineError, weights_fingerprint
from .file_hashes import HASHES, FileHashes

WEIGHTS_SCHEME = 2
"""Version of the fingerprint scheme; entries of another are stale."""
_PREFIX = f"mf{WEIGHTS_SCHEME}:"
_SCHEME_RE = re.compile(r"^mf(\d+):")


def scheme_of(fingerprint: str) -> int:
    """The scheme an engine key's fingerprint was made with (1: a bare sha256, from before schemes)."""
    m = _SCHEME_RE.match(fingerprint)
    return int(m.group(1)) if m else 1


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def origin_fingerprint(origin: WeightsOrigin, hashes: FileHashes) -> str:
    """The fingerprint of weights made as `origin` says."""
    if origin.kind == "random":
        return f"{_PREFIX}random:{_sha(origin.recipe)}"
    if origin.kind == "files":
        root = Path(origin.folder)
        files = sorted(p for p in root.rglob("*") if p.is_file())  # links followed, as the loader follows them
        if not files:
            raise EngineError(f"weights folder {root} holds no files to fingerprint")
        listing = "".join(f"{p.relative_to(root).as_posix()}\0{hashes.sha256(p)}\n" for p in files)
        return f"{_PREFIX}files:{_sha(listing)}"
    raise ValueError(f"unknown weights origin {origin.kind!r}")


def network_fingerprint(bundle: ModelBundle, network: str, hashes: FileHashes | None = None) -> str:
    """The fingerprint of the weights that run `network` in `bundle`: from their origin while the module is as
    loaded, else from its tensors. EngineError for a module built without weights whose origin is unknown."""
    hashes = hashes if hashes is not None else FileHashes(None)
    origin = bundle.origin_of(network)
    if origin is not None:
        return origin_fingerprint(origin, hashes)
    module = bundle.module_for(network)
    if any(t.device.type == "meta" for t in module.parameters()):
        raise EngineError(f"{network}: the module was built without weights (engines run it) and changed since "
                          "loading, so nothing says which weights it stands for; load it with its weights")
    return module_fingerprint(module)


def module_fingerprint(module) -> str:
    """A module's weights by their tensors (`tensors`): for weights with no origin to go by (a model changed since
    loading)."""
    return f"{_PREFIX}tensors:{weights_fingerprint(module)}"


def loaded_fingerprint(module, hashes: FileHashes | None = None) -> str:
    """A module loaded apart from a bundle (a ControlNet): from the folder it was read from while it is as read
    (`core.loading.mark_origin`), else from its tensors."""
    origin = module_origin(module)
    if origin is None:
        return module_fingerprint(module)
    return origin_fingerprint(origin, hashes if hashes is not None else FileHashes(None))


def folder_fingerprint(folder: str | Path, hashes: FileHashes | None = None) -> str:
    """What `loaded_fingerprint` gives a module read from `folder` and left as read, without loading it."""
    return origin_fingerprint(WeightsOrigin("files", folder=str(Path(folder).resolve())),
                              hashes if hashes is not None else FileHashes(None))


def folder_fingerprints(engine_dir: str | Path, folders: Sequence[str | Path], of=folder_fingerprint) -> list:
    """`of(folder, hashes)` for each folder (ControlNets' before any load), their files' sha256 taken from and kept in
    `engine_dir`'s remembered hashes: each file read at most once here, and not again by a later start."""
    hashes = FileHashes(Path(engine_dir) / HASHES)
    prints = [of(f, hashes) for f in folders]
    hashes.save()
    return prints


def lora_fingerprint(base: str, loras: Sequence[tuple[str | Path, float]], hashes: FileHashes | None = None) -> str:
    """The fingerprint of `base` weights with each (LoRA file, scale) fused in, in order: each file's sha256 and
    the scale's exact value, so another file, scale or order is another key."""
    hashes = hashes if hashes is not None else FileHashes(None)
    parts = [base] + [f"{hashes.sha256(path)}\0{float(scale).hex()}" for path, scale in loras]
    return f"{_PREFIX}lora:{_sha(chr(10).join(parts))}"


_IP_RE = re.compile(r"^(?P<base>.+)\+ip-adapter:sha256:(?P<file>[0-9a-f]{64})@scale:(?P<scale>\S+)$")


def ip_adapter_fingerprint(base: str, path: str | Path, scale: float, hashes: FileHashes | None = None) -> str:
    """The weights of a `unet_ip` engine (core/ipadapter_specs.py): the UNet's fingerprint `base`, the IP-Adapter
    file's sha256 and the scale baked in, readable (`ip_adapter_parts`), so a refusal can name the built scale and
    another file or scale is another key. The scale is written as Python's repr: exact, and read back exactly."""
    hashes = hashes if hashes is not None else FileHashes(None)
    return f"{base}+ip-adapter:sha256:{hashes.sha256(Path(path))}@scale:{float(scale)!r}"


def ip_adapter_parts(fingerprint: str) -> tuple[str, str, float] | None:
    """(UNet fingerprint, IP-Adapter file sha256, scale) of an `ip_adapter_fingerprint`; None for any other."""
    m = _IP_RE.match(fingerprint)
    if m is None:
        return None
    try:
        return m["base"], m["file"], float(m["scale"])
    except ValueError:
        return None
