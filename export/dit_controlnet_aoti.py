"""AOTInductor packages of the SD3 / FLUX ControlNets and of the transformer that takes their block samples
(issue #18 item 1 for the transformer families; docs/ALGORITHM.md §18 "ControlNet"): one static package per
precision and stage shape, as export/dit_aoti.py builds the plain transformer.

- `controlnet`: block samples = ControlNet(the transformer's inputs, control image, conditioning scale). The scale
  is an input (1,), so one package serves any scale and the schedule window's zeros. SD3's net takes the encoded
  control latent; FLUX's the packed latent tokens, or pixels for a net with a hint block (XLabs' kind).
- `transformer_controlled`: v = transformer(the plain inputs, block_0.., single_0..): the samples added where
  diffusers adds them. How many there are follows the ControlNets (`ControlLayout`), so the profiles of its key
  hold them; an XLabs-kind run repeats its samples over the blocks, which is its own variant (`blocks-repeat`).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..core.controlnet_specs import CONTROLNET
from ..core.dit_families import DiTFamily
from ..core.dit_specs import SD3TransformerWrapper
from ..core.specs import NetworkSpec, TensorSpec
from .dit_aoti import DIT_PRECISIONS, dit_axes, dit_spec
from .dit_flux_export import FluxTransformerWrapper, rotary_given
from .aoti_export import package_exported
from .onnx_export import ExportResult, cast_copy

CONTROLLED_TRANSFORMER = "transformer_controlled"
REPEAT_VARIANT = "blocks-repeat"
"""The controlled FLUX transformer's variant for XLabs-kind nets (samples repeated over the blocks)."""


@dataclass(frozen=True)
class ControlLayout:
    """The block samples the controlled transformer takes (the sum of every ControlNet's)."""

    blocks: int
    """Joint-block samples (SD3's only kind); 0: none."""
    singles: int = 0
    """FLUX single-block samples; 0: none."""
    repeat: bool = False
    """FLUX: XLabs-kind samples, repeated over the blocks (`controlnet_blocks_repeat`)."""

    def names(self) -> tuple[str, ...]:
        return (*(f"block_{i}" for i in range(self.blocks)), *(f"single_{i}" for i in range(self.singles)))


def has_hint_block(controlnet: torch.nn.Module) -> bool:
    return getattr(controlnet, "input_hint_block", None) is not None


def control_layout(controlnets) -> ControlLayout:
    """The samples of the ControlNets summed as runtime/flow_controlnet.py sums them (diffusers' Multi models):
    over the shorter list where counts differ; a FLUX kind with no samples of a kind leaves the running sum."""
    blocks = singles = 0
    for j, cn in enumerate(controlnets):
        b = len(cn.controlnet_blocks)
        s = len(getattr(cn, "controlnet_single_blocks", ()))
        if j == 0:
            blocks, singles = b, s
        elif getattr(cn.config, "num_single_layers", None) is None:  # SD3: a list every time, zipped
            blocks = min(blocks, b)
        else:
            blocks = blocks if not b or not blocks else min(blocks, b)
            singles = singles if not s or not singles else min(singles, s)
    return ControlLayout(blocks, singles, bool(controlnets) and has_hint_block(controlnets[0]))


def control_axes(family: DiTFamily, batch: int, latent_h: int, latent_w: int) -> dict[str, int]:
    """`dit_axes` with `tokens` (image tokens, both kinds) and the pixel sides of a hint-block net's image."""
    axes = dit_axes(family, batch, latent_h, latent_w)
    p = family.transformer.get("patch_size", 1) if family.kind == "sd3" else 2
    axes.setdefault("tokens", (latent_h // p) * (latent_w // p))
    axes.update(image_height=latent_h * family.vae_scale, image_width=latent_w * family.vae_scale)
    return axes


def _inner(family: DiTFamily) -> int:
    cfg = family.transformer
    return cfg["num_attention_heads"] * cfg["attention_head_dim"]


def controlnet_dit_spec(family: DiTFamily, controlnet: torch.nn.Module, precision: str) -> NetworkSpec:
    """(block_0.., single_0..) = ControlNet(hidden_states, timestep, [guidance], [encoder_hidden_states], pooled,
    [rotary cos, sin], controlnet_cond, conditioning_scale): the transformer's inputs as dit_spec has them (those
    the net takes), then the control input and the scale."""
    cfg = controlnet.config
    base = dit_spec(family, precision, bool(getattr(cfg, "guidance_embeds", False)))
    f = DIT_PRECISIONS[precision]
    inputs = [t for t in base.inputs if not (t.name == "encoder_hidden_states" and cfg.joint_attention_dim is None)]
    if family.kind == "sd3":
        cond = TensorSpec("controlnet_cond", f, ("batch", cfg.in_channels + cfg.extra_conditioning_channels,
                                                 "height", "width"))
    elif has_hint_block(controlnet):
        cond = TensorSpec("controlnet_cond", f, ("batch", 3, "image_height", "image_width"))
    else:
        cond = TensorSpec("controlnet_cond", f, ("batch", "tokens", cfg.in_channels))
    layout = control_layout([controlnet])
    outs = tuple(TensorSpec(n, f, ("batch", "tokens", _inner(family))) for n in layout.names())
    return replace(base, network=CONTROLNET, inputs=(*inputs, cond, TensorSpec("conditioning_scale", f, (1,))),
                   outputs=outs)


def controlled_dit_spec(family: DiTFamily, layout: ControlLayout, precision: str,
                        guidance_embeds: bool = True) -> NetworkSpec:
    """v = transformer(dit_spec's inputs, then the layout's block samples)."""
    base = dit_spec(family, precision, guidance_embeds)
    f = DIT_PRECISIONS[precision]
    res = tuple(TensorSpec(n, f, ("batch", "tokens", _inner(family))) for n in layout.names())
    return replace(base, network=CONTROLLED_TRANSFORMER, variant=REPEAT_VARIANT if layout.repeat else base.variant,
                   inputs=(*base.inputs, *res))


class ControlNetDiTWrapper(torch.nn.Module):
    """The ControlNet called with its spec's inputs, in order, returning its block samples flat. FLUX's rotary
    tables come in as inputs (inside `rotary_given`), as for the transformer."""

    def __init__(self, controlnet: torch.nn.Module, names: tuple[str, ...], kind: str, given=None):
        super().__init__()
        self.controlnet, self.names, self.kind, self.given = controlnet, names, kind, given

    def forward(self, *args):
        x = dict(zip(self.names, args))
        if self.kind == "sd3":
            (samples,) = self.controlnet(
                hidden_states=x["hidden_states"], timestep=x["timestep"],
                encoder_hidden_states=x.get("encoder_hidden_states"), pooled_projections=x["pooled_projections"],
                controlnet_cond=x["controlnet_cond"], conditioning_scale=x["conditioning_scale"], return_dict=False)
            return tuple(samples)
        self.given.value = (x["rotary_cos"], x["rotary_sin"])
        no_ids = torch.zeros(0, 3)  # ignored: the rotary tables are given
        blocks, singles = self.controlnet(
            hidden_states=x["hidden_states"], controlnet_cond=x["controlnet_cond"],
            conditioning_scale=x["conditioning_scale"], encoder_hidden_states=x["encoder_hidden_states"],
            pooled_projections=x["pooled_projections"], timestep=x["timestep"], guidance=x.get("guidance"),
            txt_ids=no_ids, img_ids=no_ids, return_dict=False)
        return (*(blocks or ()), *(singles or ()))


class ControlledSD3Wrapper(SD3TransformerWrapper):
    """SD3's wrapper with the block samples after the plain inputs (`transformer` as the plain wrapper names it, so
    the packages' constants carry the same names)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, *samples):
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                block_controlnet_hidden_states=list(samples), return_dict=False)[0]


class ControlledFluxWrapper(FluxTransformerWrapper):
    """FLUX's wrapper with the layout's samples after the plain inputs."""

    def __init__(self, transformer, given, layout: ControlLayout):
        super().__init__(transformer, given)
        self.layout = layout

    def forward(self, hidden_states, timestep, *rest):
        n = len(rest) - self.layout.blocks - self.layout.singles
        rest, samples = rest[:n], rest[n:]
        guidance, (states, pooled, cos, sin) = (rest[0], rest[1:]) if self.guidance_embeds else (None, rest)
        self.given.value = (cos, sin)
        no_ids = torch.zeros(0, 3)
        b = self.layout.blocks
        return self.transformer(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                                encoder_hidden_states=states, pooled_projections=pooled, txt_ids=no_ids,
                                img_ids=no_ids, controlnet_block_samples=list(samples[:b]) or None,
                                controlnet_single_block_samples=list(samples[b:]) or None,
                                controlnet_blocks_repeat=self.layout.repeat, return_dict=False)[0]


def control_wrapper(module: torch.nn.Module, family: DiTFamily, spec: NetworkSpec, layout: ControlLayout | None,
                    given=None) -> torch.nn.Module:
    """The flat-tensor module a package of `spec` is made from (`given`: FLUX's `rotary_given`, entered by the
    caller around every call)."""
    if spec.network == CONTROLNET:
        return ControlNetDiTWrapper(module, tuple(t.name for t in spec.inputs), family.kind, given)
    if family.kind == "sd3":
        return ControlledSD3Wrapper(module)
    return ControlledFluxWrapper(module, given, layout)


def export_dit_control_aoti(module: torch.nn.Module, family: DiTFamily, spec: NetworkSpec, path: str | os.PathLike,
                            batch: int, latent_h: int, latent_w: int, layout: ControlLayout | None = None, *,
                            device: str = "cpu", kernel_context=contextlib.nullcontext) -> ExportResult:
    """Exports `module` (a ControlNet for `controlnet`, the transformer for `transformer_controlled` with `layout`)
    at (batch, latent size) and compiles it into the package `path` (`.pt2`). The caller's module is left as is."""
    t0 = time.perf_counter()
    path = Path(path)
    dtype = spec.inputs[0].torch_dtype
    if dtype != module.dtype or torch.device(device).type != module.device.type:
        module = cast_copy(module, dtype).to(device)
    g = torch.Generator().manual_seed(0)
    axes = control_axes(family, batch, latent_h, latent_w)
    args = tuple(torch.randn(t.concrete(axes), generator=g).to(device=device, dtype=t.torch_dtype)
                 for t in spec.inputs)
    def trace():
        with contextlib.ExitStack() as stack:
            given = stack.enter_context(rotary_given(module)) if family.kind == "flux" else None
            wrapper = control_wrapper(module, family, spec, layout, given)
            return torch.export.export(wrapper.eval(), args, strict=False)

    return package_exported(trace, path, f"{spec.name} at latent {latent_w}x{latent_h}", t0,
                            kernel_context=kernel_context)
