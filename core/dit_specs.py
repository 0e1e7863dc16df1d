"""I/O spec and flat-tensor wrapper of the SD3 transformer: what its ONNX export traces and an engine binds.

Dynamic axes: `batch` (the CFG batch of 2), `height` and `width` (latent cells; multiples of the patch size).
SD3's learned position table is cropped to the latent size inside the graph, so one export serves every stage
size up to pos_embed_max_size patches a side. FLUX exports with its rotary tables as inputs
(export/dit_flux_export.py).
"""
from __future__ import annotations

import torch

from .dit_families import DiTFamily
from .dilation import Variant
from .specs import NetworkSpec, TensorSpec

TRANSFORMER = "transformer"


def sd3_text_length(family: DiTFamily) -> int:
    """Tokens the SD3 transformer reads: 77 CLIP tokens, then T5's."""
    return 77 + family.t5_max_length


def transformer_spec(family: DiTFamily, precision: str = "fp32") -> NetworkSpec:
    """v = transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections)."""
    if family.kind != "sd3":
        raise ValueError(f"no transformer spec for {family.name}: only the SD3 transformer is exported")
    f = "float16" if precision == "fp16" else "float32"
    cfg = family.transformer
    lat = ("batch", cfg["in_channels"], "height", "width")
    inputs = (TensorSpec("hidden_states", f, lat),
              TensorSpec("timestep", "float32", ("batch",)),  # 1000 sigma: float32 keeps it exact at fp16
              TensorSpec("encoder_hidden_states", f, ("batch", sd3_text_length(family), cfg["joint_attention_dim"])),
              TensorSpec("pooled_projections", f, ("batch", cfg["pooled_projection_dim"])))
    return NetworkSpec(TRANSFORMER, Variant.STANDARD, 1, precision, inputs,
                       (TensorSpec("velocity", f, (lat[0], cfg["out_channels"], "height", "width")),), (1, 2, 2))


class SD3TransformerWrapper(torch.nn.Module):
    """The transformer called with the spec's inputs, in order, returning v."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]
