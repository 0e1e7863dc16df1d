"""`models.json` beside the manifest: what a runtime without the model's Python objects needs to run the
engines (the C++ library, cpp/src/lib): the VAE scaling factor, each text encoder's vocabulary size, and the
weights fingerprint of each network's latest build, which picks the entries when several builds share a folder.

    {"format": 1, "models": {"sdxl": {"vae_scaling_factor": 0.13025, "vocab_sizes": [49408, 49408],
                                      "weights": {"unet": "<sha256>", ...}, "source": "random weights"}}}

Written atomically under the cache's lock after a build; a model's networks not built this time keep their
earlier fingerprints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.loading import ModelBundle

from .cache import CorruptManifestError, EngineCache

MODELS = "models.json"
FORMAT = 1
"""Format version, checked by readers (the C++ library refuses another)."""


def read_models(root: str | os.PathLike) -> dict[str, dict]:
    """The models recorded in `root` ({} if there is no file); CorruptManifestError naming a bad file."""
    path = Path(root) / MODELS
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or not isinstance(data.get("models"), dict):
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return data["models"]
    except (ValueError, AttributeError) as e:
        raise CorruptManifestError(f"model facts file {path} is corrupt ({e}); delete it and rebuild") from None
    except RecursionError:  # json recurses once per nesting level: `[[[[...` exhausts the stack
        raise CorruptManifestError(
            f"model facts file {path} is corrupt (nested too deeply to read); delete it and rebuild") from None


def record_model(cache: EngineCache, bundle: ModelBundle, weights: dict[str, str]) -> dict:
    """Merges this build's facts for `bundle`'s model into `models.json`; returns the model's record."""
    fam = bundle.family
    with cache.locked():
        models = read_models(cache.root)
        rec = dict(models.get(fam.name, {}))
        rec["vae_scaling_factor"] = float(bundle.vae.config.scaling_factor)
        rec["vocab_sizes"] = [int(te.config.vocab_size) for te in bundle.text_encoders]
        rec["weights"] = {**rec.get("weights", {}), **weights}
        rec["source"] = str(bundle.source)
        models[fam.name] = rec
        cache.write_json(MODELS, {"format": FORMAT, "models": models})
    return rec


def record_controlnets(cache: EngineCache, model: str, controlnets: dict[str, tuple[str, str]],
                       facts: dict[str, dict] | None = None) -> None:
    """Records ControlNets built into `cache` for `model` (name -> (weights fingerprint, source folder)) under the
    model's "controlnets", so the C API can take a ControlNet by its folder's name (cpp/src/lib/control_entries.hpp).
    `facts`: name -> more fields of its record (SD3 / FLUX nets: what the C API cannot read from the packages,
    engine/dit_controlnet_engines.py). A name built again with other weights points at the latest."""
    with cache.locked():
        models = read_models(cache.root)
        rec = dict(models.get(model, {}))
        known = dict(rec.get("controlnets", {}))
        known.update({name: {"weights": fp, "source": src, **(facts or {}).get(name, {})}
                      for name, (fp, src) in controlnets.items()})
        rec["controlnets"] = known
        models[model] = rec
        cache.write_json(MODELS, {"format": FORMAT, "models": models})
