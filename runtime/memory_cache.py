"""The memory estimate kept between starts (issue #15): `core/memory.estimate_memory` runs the networks on the meta
device, about 11 s for SDXL at 2048 on a CPU core, and gives the same answer for the same inputs. So each estimate is
kept in a small JSON file, keyed by everything it depends on: the family's network configs, the plan's stage shapes
(not its steps), the dtypes, the CFG batch, the relay, the VAE tiling, the graph pool, the library versions and the
estimator's own source. A file that cannot be read, or an entry that is not an estimate, is ignored and rewritten:
it is never trusted blindly, and a cache that cannot be written costs a recomputation, nothing more.

Where: `memory-estimates.json` in the engine folder when a run has one (it travels with the engines), else in
$MEGAFUSION_CACHE, else $XDG_CACHE_HOME/megafusion, else ~/.cache/megafusion.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from ..core.families import ModelFamily
from ..core.memory import MemoryEstimate
from ..core.plan import StagePlan
from .vae_tiling import VaeTiling

FILE = "memory-estimates.json"
SCHEME = 1
"""Bumped when an entry's layout changes; a file of another scheme is ignored and rewritten."""
MAX_ENTRIES = 256
"""The oldest entries go first past this: the file stays a few hundred KB at most."""
_SOURCES = ("core/memory.py", "runtime/memory_plan.py", "runtime/vae_tiling.py", "runtime/vae_parking.py")
"""What computes an estimate: an edit to any of them is another estimator, so another key."""


def default_path(engine_dir: str | Path | None = None) -> Path:
    """Where the estimates are kept (see the module's docstring)."""
    if engine_dir is not None:
        return Path(engine_dir) / FILE
    base = os.environ.get("MEGAFUSION_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg if xdg and os.path.isabs(xdg) else os.path.expanduser("~/.cache"), "megafusion")
    return Path(base) / FILE


@lru_cache(maxsize=1)
def _estimator_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()


def estimate_key(family: ModelFamily, plan: StagePlan, unet_dtype: torch.dtype, vae_dtype: torch.dtype, cfg: bool,
                 relay: str, tiling: VaeTiling | None, graph_pool: bool) -> str:
    """A digest of everything `estimate_memory` reads."""
    from ..core.loading import library_version  # not the libraries themselves: a start from engines imports neither

    vocab = family.vocab_size or 514  # as estimate_memory builds the text encoders
    parts = {
        "family": family.name, "unet": family.unet, "vae": family.vae, "vae_scale": family.vae_scale,
        "xl": family.is_xl, "text": [te.transformers_config(vocab) for te in family.text_encoders],
        "projection": [getattr(te, "projection_dim", None) for te in family.text_encoders],
        "shapes": [(s.height, s.width) for s in plan.stages],
        "dtypes": (str(unet_dtype), str(vae_dtype)), "cfg": cfg, "relay": relay,
        "tiling": None if tiling is None else (tiling.tile, tiling.park), "graph_pool": graph_pool,
        "versions": (torch.__version__, library_version("diffusers"), library_version("transformers")),
        "estimator": _estimator_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _to_json(e: MemoryEstimate) -> dict:
    return {"weights": e.weights_bytes, "segments": [[n, b] for n, b in e.segments], "held": list(e.held),
            "host": e.host_bytes}


def _from_json(d) -> MemoryEstimate | None:
    """The estimate, or None for anything that is not one (hand-edited, truncated, another layout)."""
    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    try:
        segments = tuple((n, b) for n, b in d["segments"])
        held = tuple(d["held"])
        ok = (count(d["weights"]) and count(d["host"]) and segments and all(isinstance(n, str) and count(b)
              for n, b in segments) and all(count(b) for b in held) and len(held) in (0, len(segments)))
    except (TypeError, KeyError, ValueError):
        return None
    return MemoryEstimate(d["weights"], segments, held, d["host"]) if ok else None


class EstimateCache:
    """The estimates of one file; `computed` and `reused` count this process's misses and hits."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.computed = self.reused = 0
        self._entries: dict | None = None

    def _load(self) -> dict:
        if self._entries is None:
            try:
                data = json.loads(self.path.read_text())
                ok = isinstance(data, dict) and data.get("scheme") == SCHEME and isinstance(data.get("entries"), dict)
                self._entries = dict(data["entries"]) if ok else {}
            except (OSError, ValueError, UnicodeDecodeError):  # missing or corrupt: start afresh, rewrite it
                self._entries = {}
        return self._entries

    def estimate(self, key: str, compute: Callable[[], MemoryEstimate]) -> MemoryEstimate:
        """The kept estimate for `key`, else `compute()`'s, kept."""
        entries = self._load()
        kept = _from_json(entries.get(key)) if key in entries else None
        if kept is not None:
            self.reused += 1
            return kept
        value = compute()
        self.computed += 1
        entries.pop(key, None)
        entries[key] = _to_json(value)  # newest last: the oldest are dropped first
        while len(entries) > MAX_ENTRIES:
            entries.pop(next(iter(entries)))
        self._save(entries)
        return value

    def _save(self, entries: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"scheme": SCHEME, "entries": entries}))
            os.replace(tmp, self.path)  # never a half-written file under the real name
        except OSError:  # a read-only folder: the estimate stands, the next start computes it again
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
