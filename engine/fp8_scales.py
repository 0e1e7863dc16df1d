"""Static FP8 input scales kept between processes: one JSON file per (weights, FP8 policy, calibration recipe,
plan shapes, dtype, device), so that a later start of the same configuration skips the calibration runs.

The scales depend on the values the layers see: on the weights (fingerprint), on which layers are FP8 (policy),
on the inputs (recipe, stage shapes, dilation, CFG batch) and, less, on the dtype and the GPU's kernels. A file
whose recorded key differs from the one asked for (a digest collision, a file copied in by hand) is ignored and
replaced; files are written atomically, so a killed process leaves none half-written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .cache import atomic_write

SCALES_VERSION = 1
"""Version of the file format and of the calibration procedure (runtime/fp8_calibration.py); others are stale."""


@dataclass(frozen=True)
class Fp8Calibration:
    """The inputs static scales are calibrated on: not the prompt, seed or timesteps anyone measures with."""

    prompt: str = "an old stone bridge over a river in autumn"
    seed: int = 1234
    timesteps: tuple[int, ...] = (981, 801, 501, 301, 101, 1)
    """Each stage shape is run at every one of these (early, pure noise, to late steps)."""
    margin: float = 1.0
    """The scale maps margin x (largest input magnitude seen) onto e4m3's 448; larger inputs saturate."""

    def __post_init__(self):
        if not self.timesteps or any(not 0 <= t < 1000 for t in self.timesteps):
            raise ValueError(f"calibration timesteps {self.timesteps}: need at least one, each in [0, 1000)")
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise ValueError(f"calibration margin {self.margin}: must be a finite number > 0")


@dataclass(frozen=True)
class ScalesKey:
    """What a set of static scales is valid for."""

    weights: str
    """The UNet's weights fingerprint (engine/fingerprint.py), taken before the UNet was changed for speed."""
    scheme: str
    """`fp8_scheme(policy)`: which layers are FP8."""
    recipe: str
    """`Fp8Calibration` as JSON."""
    shapes: str
    """Stage sizes, mid-block dilation and CFG batch of the calibration runs."""
    dtype: str
    device: str
    """'cpu' or the GPU's name."""
    version: int = SCALES_VERSION

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def recipe_text(recipe: Fp8Calibration) -> str:
    return json.dumps(asdict(recipe), sort_keys=True)


def recipe_digest(recipe: Fp8Calibration) -> str:
    """sha256 of the recipe and SCALES_VERSION: what a static FP8 package's key names (engine/fp8.py
    `key_quantization`), so a package calibrated another way is another entry."""
    return hashlib.sha256(f"{SCALES_VERSION}\0{recipe_text(recipe)}".encode()).hexdigest()


class ScaleStore:
    """`<root>/fp8-scales-<digest>.json`: {"key": ScalesKey, "scales": {layer: scale}, "seconds": calibration}."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: ScalesKey) -> Path:
        return self.root / f"fp8-scales-{key.digest()[:32]}.json"

    def load(self, key: ScalesKey) -> dict[str, float] | None:
        """The scales stored for `key`, or None if there are none valid (missing, foreign key, unreadable, or a
        scale that is not a finite number > 0)."""
        try:
            data = json.loads(self.path(key).read_text())
            if data.get("key") != asdict(key):
                return None
            scales = {str(k): float(v) for k, v in data["scales"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not scales or any(not (math.isfinite(v) and v > 0) for v in scales.values()):
            return None
        return scales

    def save(self, key: ScalesKey, scales: dict[str, float], seconds: float) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        body = json.dumps({"key": asdict(key), "scales": scales, "seconds": round(seconds, 3)}, indent=1)
        atomic_write(path, body.encode())
        return path
