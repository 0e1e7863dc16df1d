"""The IP-Adapter image encoder as an engine (issue #18 item 2; core/image_encoder_specs.py): built beside the
unet_ip engines (`mf-build-engines ... --ip-adapter FILE --ip-adapter-encoder DIR`), opened by mf-generate
--engines when present (else the encoder runs in torch), and run by libmegafusion for mf_inputs_set_ip_adapter_image.

The entry's key holds the encoder folder's fingerprint (every file in it: weights, config and preprocessor config).
models.json records, per fingerprint, what a runtime without transformers needs (`record_image_encoder`): the
embedding length, the input side and the image processor's steps and constants (`preprocess_facts`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..core.families import ModelFamily, get_family
from ..core.image_encoder import load_image_encoder, load_image_processor, read_encoder_config
from ..core.image_encoder_specs import (IMAGE_ENCODER, image_encoder_requirement, preprocess_facts,
                                        spec_of_config)
from ..core.loading import WeightsOrigin
from ..core.specs import NetworkSpec
from .backend import NetworkExport, OpenContext, get_backend
from .build import BuildReport, BuildRequest
from .cache import EngineCache, EngineKey, device_name
from .controlnet_engines import CONTROL_BACKENDS, build_entry, start_build
from .file_hashes import HASHES, FileHashes
from .fingerprint import origin_fingerprint
from .runners import Runner, run_spec


def encoder_fingerprint(folder: str | Path, hashes: FileHashes | None = None) -> str:
    """The encoder folder's weights fingerprint (`mf2:files:...`, over every file in it)."""
    origin = WeightsOrigin("files", folder=str(Path(folder).resolve()))
    return origin_fingerprint(origin, hashes if hashes is not None else FileHashes(None))


def encoder_key(model: str, spec: NetworkSpec, backend: str, version: str, device: str, fingerprint: str) -> EngineKey:
    r = image_encoder_requirement(spec)
    return EngineKey(model, fingerprint, IMAGE_ENCODER, spec.variant, 1, spec.precision, r.profiles, backend, version,
                     device)


def build_image_encoder_engine(family: ModelFamily, folder: str | Path, req: BuildRequest,
                               log: Callable[[str], None] = lambda msg: None) -> BuildReport:
    """Builds the encoder of `folder` into `req.output` at `req.precision` for `req.backend` (aoti or onnxruntime;
    skipped when a valid entry is there) and records its preprocessing in models.json."""
    backend, cache, version, device = start_build(req, "--ip-adapter-encoder")
    spec = spec_of_config(read_encoder_config(folder), req.precision)
    fp = encoder_fingerprint(folder, FileHashes(Path(req.output) / HASHES))
    key = encoder_key(family.name, spec, backend.name, version, device, fp)
    side, dim = spec.inputs[0].shape[-1], spec.outputs[0].shape[-1]
    report = BuildReport()

    def export(tmp: Path):
        from ..export.image_encoder_export import export_image_encoder_aoti, export_image_encoder_onnx

        encoder, _ = load_image_encoder(folder, "cpu", torch.float32)  # only when the entry is missing
        return backend.export(NetworkExport(
            aoti=lambda path, ctx: export_image_encoder_aoti(encoder, spec, path, device=req.device,
                                                             kernel_context=ctx),
            onnx=lambda path: export_image_encoder_onnx(encoder, spec, path, device=req.device)), tmp, req.device)

    build_entry(cache, key, f"[ip-adapter encoder] {spec.name} ({side}x{side} -> {dim}, weights {fp[-12:]})", req,
                f"{backend.name} {version} on {device}", report, log, export)
    record_image_encoder(cache, family.name, fp, folder, spec, load_image_processor(folder))
    return report


def record_image_encoder(cache: EngineCache, model: str, fingerprint: str, folder: str | Path, spec: NetworkSpec,
                         processor) -> None:
    """models.json's `image_encoders` of `model`: {fingerprint: {source, image_size, projection_dim, preprocess}}."""
    from .model_facts import FORMAT, MODELS, read_models

    with cache.locked():
        models = read_models(cache.root)
        rec = dict(models.get(model, {}))
        known = dict(rec.get("image_encoders", {}))
        known[fingerprint] = {"source": str(Path(folder).resolve()), "image_size": int(spec.inputs[0].shape[-1]),
                              "projection_dim": int(spec.outputs[0].shape[-1]),
                              "preprocess": preprocess_facts(processor)}
        rec["image_encoders"] = known
        models[model] = rec
        cache.write_json(MODELS, {"format": FORMAT, "models": models})


def open_image_encoder(engine_dir: str | Path, model: str, folder: str | Path, backend: str, precision: str,
                       device: torch.device | str = "cpu") -> Runner | None:
    """The folder's encoder engine for the encoder in `folder` (its fingerprint), of `backend` and `precision`,
    for this backend version and device, verified; None when there is none (the caller runs the encoder in
    torch)."""
    engine_dir, device = Path(engine_dir), torch.device(device)
    cache = EngineCache(engine_dir)
    if backend not in CONTROL_BACKENDS or not any(
            (e.key.model, e.key.network, e.key.backend) == (model, IMAGE_ENCODER, backend)
            for e in cache.entries().values()):
        return None  # without hashing the encoder's folder (gigabytes for a real one) for nothing
    hashes = FileHashes(engine_dir / HASHES)
    spec = spec_of_config(read_encoder_config(folder), precision)
    key = encoder_key(model, spec, backend, get_backend(backend).version(), device_name(device),
                      encoder_fingerprint(folder, hashes))
    entry = cache.lookup(key, hashes)
    hashes.save()
    if entry is None:
        return None
    return get_backend(backend).open(entry, engine_dir / entry.files[0].path, spec,
                                     OpenContext(get_family(model), device))


@torch.inference_mode()
def encode_with_engine(runner: Runner, processor, image, device) -> torch.Tensor:
    """(1, 1, D) image embeddings of a PIL image from the encoder engine, as runtime/ipadapter.encode_ip_image
    gives them from the torch encoder."""
    pixels = processor(image, return_tensors="pt").pixel_values
    return run_spec(runner, {"pixel_values": pixels}, torch.device(device))["image_embeds"].float()[None]
