"""ONNX export of the FLUX transformer with dynamic batch and token count (one file serves every stage size).

Two things stop the TorchScript exporter that export/dit_onnx_export.py uses for SD3 (torch 2.13, diffusers 0.42):
the q/k RMS norms are `aten::rms_norm`, which it has no symbolic for at opset 18, and the rotary embedding,
computed inside the model from the position ids, is traced with the sample's token count as a constant. So the
rotary embedding (cos, sin per position: text tokens, then image tokens) is computed outside, by the model's own
`pos_embed`, and given as two inputs; and the export runs through the dynamo exporter, which lowers rms_norm
and, with the rotary tables as inputs, keeps the token axis symbolic. It is traced at batch 2: the dynamo
exporter specialises an axis traced at size 1.
"""
from __future__ import annotations

import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core.dilation import Variant
from ..core.dit_families import DiTFamily
from ..core.dit_loading import DiTBundle
from ..core.dit_specs import TRANSFORMER
from ..core.specs import NetworkSpec, TensorSpec
from .onnx_export import PROTOBUF_LIMIT, _finish

OPSET = 18


def flux_transformer_spec(family: DiTFamily, precision: str = "fp32", guidance_embeds: bool = True) -> NetworkSpec:
    """v tokens = transformer(hidden_states tokens, timestep sigma, [guidance], encoder_hidden_states, pooled,
    rotary cos, rotary sin); `tokens` = (h/2)(w/2) packed latent cells, `positions` = text tokens + tokens."""
    if family.kind != "flux":
        raise ValueError(f"no FLUX transformer spec for {family.name}: it is a {family.kind} model")
    f = "float16" if precision == "fp16" else "float32"
    cfg = family.transformer
    head = cfg["attention_head_dim"]
    tokens = ("batch", "tokens", cfg["in_channels"])
    inputs = (TensorSpec("hidden_states", f, tokens),
              TensorSpec("timestep", f, ("batch",)),  # sigma, in the model's dtype as the pipeline passes it
              *((TensorSpec("guidance", "float32", ("batch",)),) if guidance_embeds else ()),
              TensorSpec("encoder_hidden_states", f, ("batch", family.t5_max_length, cfg["joint_attention_dim"])),
              TensorSpec("pooled_projections", f, ("batch", cfg["pooled_projection_dim"])),
              TensorSpec("rotary_cos", "float32", ("positions", head)),
              TensorSpec("rotary_sin", "float32", ("positions", head)))
    out = TensorSpec("velocity", f, ("batch", "tokens", cfg.get("out_channels") or cfg["in_channels"]))
    return NetworkSpec(TRANSFORMER, Variant.STANDARD, 1, precision, inputs, (out,), (1, 1, 2))


class _GivenRotary(torch.nn.Module):
    """Stands in for the model's `pos_embed`: returns the (cos, sin) the wrapper was called with."""

    def __init__(self):
        super().__init__()
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, ids):
        return self.value


@contextmanager
def rotary_given(transformer: torch.nn.Module):
    """The transformer with its `pos_embed` replaced by a `_GivenRotary` while in the block; restored after."""
    own, given = transformer.pos_embed, _GivenRotary()
    transformer.pos_embed = given
    try:
        yield given
    finally:
        transformer.pos_embed = own


class FluxTransformerWrapper(torch.nn.Module):
    """The transformer called with the spec's inputs, in order (inside `rotary_given`), returning v tokens."""

    def __init__(self, transformer: torch.nn.Module, given: _GivenRotary):
        super().__init__()
        self.transformer, self.given = transformer, given
        self.guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))

    def forward(self, hidden_states, timestep, *rest):
        guidance, (states, pooled, cos, sin) = (rest[0], rest[1:]) if self.guidance_embeds else (None, rest)
        self.given.value = (cos, sin)
        no_ids = torch.zeros(0, 3)  # ignored: the rotary tables are given
        return self.transformer(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                                encoder_hidden_states=states, pooled_projections=pooled, txt_ids=no_ids,
                                img_ids=no_ids, return_dict=False)[0]


def export_flux_transformer(bundle: DiTBundle, path: str | Path, precision: str = "fp32",
                            sample_latent: tuple[int, int] = (8, 12),
                            external_threshold: int = PROTOBUF_LIMIT) -> tuple[Path, ...]:
    """Writes `path` (and `<path>.data` past `external_threshold`); returns the files. Traced at batch 2 and
    `sample_latent` (latent cells; its token count must differ from every other axis's size)."""
    fam, tr = bundle.family, bundle.transformer
    guidance = bool(getattr(tr.config, "guidance_embeds", False))
    spec = flux_transformer_spec(fam, precision, guidance)
    dtype = spec.outputs[0].torch_dtype
    if tr.dtype != dtype:
        raise ValueError(f"export at {precision} needs the transformer in {dtype}, not {tr.dtype}")
    h, w = sample_latent
    axes = {"batch": 2, "tokens": (h // 2) * (w // 2), "positions": fam.t5_max_length + (h // 2) * (w // 2)}
    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(t.concrete(axes), generator=g).to(t.torch_dtype).to(tr.device) for t in spec.inputs)
    shapes = [{i: torch.export.Dim.DYNAMIC for i in t.dynamic_axes()} for t in spec.inputs]
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-transformer-") as tmp, \
            rotary_given(tr) as given, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(FluxTransformerWrapper(tr, given).eval(), args, str(raw),
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_shapes=(shapes[0], shapes[1], tuple(shapes[2:])),  # forward's (a, b, *rest)
                          opset_version=OPSET, dynamo=True, verbose=False)
        return _finish(raw, path, False, external_threshold)
