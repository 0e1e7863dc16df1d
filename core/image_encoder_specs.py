"""Spec of the IP-Adapter image encoder engine (issue #18 item 2): `image_encoder`, a CLIP vision model with
projection (transformers' CLIPVisionModelWithProjection), whose `image_embeds` the unet_ip engines take.

Input `pixel_values` (1, 3, S, S), S the encoder config's `image_size`: the reference image after the image
processor (resize, center crop, rescale, normalize; `preprocess_facts`). Output `image_embeds` (1, D), D the
config's `projection_dim`. One image per generation, so the batch is fixed at 1 (a static package). Its key's
weights field is the encoder folder's fingerprint (engine/image_encoder_engines.py), which covers its config and
preprocessor config too.
"""
from __future__ import annotations

from .specs import NetworkSpec, Requirement, ShapeProfile, TensorSpec

IMAGE_ENCODER = "image_encoder"

RESAMPLES = {2: "bilinear", 3: "bicubic"}
"""PIL resample codes an image processor may name that libmegafusion reproduces (cpp/src/lib/clip_image.cpp)."""


def image_encoder_spec(image_size: int, projection_dim: int, precision: str = "fp32") -> NetworkSpec:
    """image_embeds = CLIPVisionModelWithProjection(pixel_values).image_embeds, at batch 1."""
    f = "float16" if precision == "fp16" else "float32"
    s, d = int(image_size), int(projection_dim)
    return NetworkSpec(IMAGE_ENCODER, "standard", 1, precision, (TensorSpec("pixel_values", f, (1, 3, s, s)),),
                       (TensorSpec("image_embeds", f, (1, d)),), (1, 1, 1))


def spec_of_config(config, precision: str = "fp32") -> NetworkSpec:
    """The spec of an encoder from its CLIPVisionConfig (or the loaded model's `.config`)."""
    return image_encoder_spec(config.image_size, config.projection_dim, precision)


def image_encoder_requirement(spec: NetworkSpec) -> Requirement:
    """Its one fixed-shape profile (stage 0: it runs once, before the plan's first step)."""
    shape = spec.inputs[0].shape
    return Requirement(spec, (ShapeProfile(0, (("pixel_values", shape, shape, shape),)),))


def preprocess_facts(processor) -> dict:
    """What a runtime without transformers needs to turn an RGB8 image into `pixel_values` as `processor` (a
    CLIPImageProcessor) does: engine/image_encoder_engines.py writes it into models.json for the C API."""
    d = processor.to_dict()

    def sizes(v):
        return {k: int(x) for k, x in dict(v or {}).items() if x is not None}

    return {"do_resize": bool(d.get("do_resize", True)), "size": sizes(d.get("size")),
            "resample": int(d.get("resample", 3)), "do_center_crop": bool(d.get("do_center_crop", True)),
            "crop_size": sizes(d.get("crop_size")), "do_rescale": bool(d.get("do_rescale", True)),
            "rescale_factor": float(d.get("rescale_factor", 1 / 255)),
            "do_normalize": bool(d.get("do_normalize", True)),
            "image_mean": [float(x) for x in d.get("image_mean") or (0.0, 0.0, 0.0)],
            "image_std": [float(x) for x in d.get("image_std") or (1.0, 1.0, 1.0)]}
