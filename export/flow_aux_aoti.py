"""AOTInductor packages of SD3's and FLUX's text encoders and 16-channel VAE: what the flow pipeline runs beside the
transformer (runtime/flow_conditioning.py, runtime/flow_pipeline.py), so a C++ caller needs no Python for them.

Networks and names are the UNet families' (core/specs.py): `text_encoder`, `text_encoder_2` (the CLIP encoders),
then T5 as the last `text_encoder_N`; `vae_decoder`, `vae_encoder`. One static package per shape, batch 1 (each
prompt is encoded on its own; the stage loop decodes one latent). Every float input and output is float32 whatever
the package's precision: the cast to the module's dtype (T5 in bf16 under fp16, core/dit_loading.T5_FP16_DTYPE)
happens inside the package, as FlowTorchNetworks casts around the module, so callers feed and read one dtype.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from ..core.dilation import Variant
from ..core.dit_families import DiTFamily
from ..core.specs import TEXT_LENGTH, VAE_DECODER, VAE_ENCODER, NetworkSpec, TensorSpec, text_encoder_name
from .aoti_export import package_exported
from .onnx_export import ExportResult

FLOW_AUX_PRECISIONS = ("fp32", "fp16", "bf16")
"""The precision recorded in the key: the folder's (the modules run in the dtype the bundle was loaded in)."""


def flow_text_encoder_specs(family: DiTFamily, precision: str) -> tuple[NetworkSpec, ...]:
    """CLIP encoder i: ids (1, 77) -> (penultimate hidden states, pooled: the projection where the encoder has one,
    else the pooler output); T5 (last): ids (1, t5_max_length) -> last hidden states. As FlowTorchNetworks.clip/t5."""
    out = []
    for i, te in enumerate(family.text_encoders):
        pooled = te.projection_dim if te.with_projection else te.hidden_size
        out.append(NetworkSpec(text_encoder_name(i), Variant.STANDARD, 1, precision,
                               (TensorSpec("input_ids", "int32", (1, TEXT_LENGTH)),),
                               (TensorSpec("hidden_states", "float32", (1, TEXT_LENGTH, te.hidden_size)),
                                TensorSpec("pooled", "float32", (1, pooled))), (1, 1, 1)))
    t5 = text_encoder_name(len(family.text_encoders))
    out.append(NetworkSpec(t5, Variant.STANDARD, 1, precision,
                           (TensorSpec("input_ids", "int32", (1, family.t5_max_length)),),
                           (TensorSpec("hidden_states", "float32", (1, family.t5_max_length,
                                                                    int(family.t5["d_model"]))),), (1, 1, 1)))
    return tuple(out)


def flow_vae_specs(family: DiTFamily, precision: str) -> tuple[NetworkSpec, NetworkSpec]:
    """(encoder: image in [-1, 1] -> posterior mean, decoder: latent -> image); latents unscaled, unshifted."""
    lat = TensorSpec("latent", "float32", ("batch", family.latent_channels, "height", "width"))
    img = TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width"))
    return (NetworkSpec(VAE_ENCODER, Variant.STANDARD, 1, precision, (img,), (lat,), (1, 1, 1)),
            NetworkSpec(VAE_DECODER, Variant.STANDARD, 1, precision, (lat,), (img,), (1, 1, 1)))


class ClipWrapper(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids.long(), output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2].float(), pooled.float()


class T5Wrapper(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids.long())[0].float()


class FlowVaeWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module, encoder: bool):
        super().__init__()
        self.vae, self.encoder = vae, encoder

    def forward(self, x):
        x = x.to(self.vae.dtype)
        if self.encoder:
            return self.vae.encode(x).latent_dist.mean.float()
        return self.vae.decode(x, return_dict=False)[0].float()


def flow_aux_wrapper(bundle, spec: NetworkSpec) -> torch.nn.Module:
    """The flat-tensor module of `spec`'s network in `bundle` (a DiTBundle)."""
    if spec.network in (VAE_ENCODER, VAE_DECODER):
        return FlowVaeWrapper(bundle.vae, spec.network == VAE_ENCODER)
    names = [text_encoder_name(i) for i in range(len(bundle.text_encoders))]
    i = names.index(spec.network)
    enc = bundle.text_encoders[i]
    return T5Wrapper(enc) if i == len(names) - 1 else ClipWrapper(enc)


def export_flow_aux_aoti(bundle, spec: NetworkSpec, shapes: tuple[tuple[int, ...], ...], path: str | os.PathLike, *,
                         device: str = "cpu", kernel_context=contextlib.nullcontext) -> ExportResult:
    """Exports `spec`'s network at the static input `shapes` into the package `path` (`.pt2`). The bundle's module
    must already be on `device` in its run dtype (mf-build-engines loads it so)."""
    t0 = time.perf_counter()
    path = Path(path)
    g = torch.Generator().manual_seed(0)
    args = []
    for t, shape in zip(spec.inputs, shapes):
        x = (torch.randint(0, 500, shape, generator=g, dtype=torch.int32) if t.dtype == "int32"
             else torch.randn(shape, generator=g).clamp(-1, 1))
        args.append(x.to(device))
    def trace():
        return torch.export.export(flow_aux_wrapper(bundle, spec).eval(), tuple(args), strict=False)

    return package_exported(trace, path, f"{bundle.family.name} {spec.name} at {shapes[0]}", t0,
                            kernel_context=kernel_context)
