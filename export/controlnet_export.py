"""Export of the ControlNet engines (core/controlnet_specs.py) to ONNX and to static AOTInductor packages.

The ControlNet's mid block is a copy of the UNet's, so its dilated variant is exported, like the dilated UNet, with
the mid-block dilation set during the trace. The ONNX clean-up and the AOTInductor compile are export/'s own.
"""
from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.controlnet_specs import CONTROLNET, ControlSpec
from ..core.dilation import mid_dilation
from ..core.families import ModelFamily
from .aoti_export import dynamic_shapes, package_exported
from .onnx_export import OPSET, PROTOBUF_LIMIT, ExportError, ExportResult, _finish, cast_copy


class ControlNetWrapper(torch.nn.Module):
    """(down_0..down_n, mid) from flat tensors."""

    def __init__(self, controlnet: torch.nn.Module, xl: bool):
        super().__init__()
        self.controlnet, self.xl = controlnet, xl

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.xl:
            text_embeds, time_ids, *rest = rest
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        cond, scale = rest
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=cond, conditioning_scale=scale, added_cond_kwargs=added,
                                    return_dict=False)
        return (*down, mid)


class ControlledUNetWrapper(torch.nn.Module):
    """eps from flat tensors, the residuals added as diffusers adds a ControlNet's."""

    def __init__(self, unet: torch.nn.Module, xl: bool):
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.xl:
            text_embeds, time_ids, *rest = rest
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        *down, mid = rest
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid,
                         return_dict=False)[0]


def _wrapper(module: torch.nn.Module, spec: ControlSpec, xl: bool, wrap=None) -> torch.nn.Module:
    """`wrap(module, xl)`: another network's flat-tensor wrapper (export/ipadapter_export.py), exported alike."""
    if wrap is not None:
        return wrap(module, xl).eval()
    return (ControlNetWrapper if spec.network == CONTROLNET else ControlledUNetWrapper)(module, xl).eval()


def _module_on(module: torch.nn.Module, spec: ControlSpec, device: str) -> tuple[torch.nn.Module, bool]:
    """The module in the spec's dtype on `device` (a cast copy when it is not; the caller's module untouched)."""
    dtype = spec.outputs[0].torch_dtype
    if dtype != module.dtype or torch.device(device).type != module.device.type:
        return cast_copy(module, dtype).to(device), True
    return module, False


def export_control_onnx(module: torch.nn.Module, family: ModelFamily, spec: ControlSpec, path: str | os.PathLike,
                        *, device: str = "cpu", clean: bool = True, wrap=None) -> ExportResult:
    """Exports `module` (a diffusers ControlNetModel, or the UNet for `unet_controlled`) to the `.onnx` file `path`:
    batch and spatial axes dynamic, traced at the smallest legal latent on CPU (as export_onnx does, for the same
    reason), at the native size on a GPU."""
    t0 = time.perf_counter()
    path = Path(path)
    side = 2 ** family.unet_downsamples
    h, w = (side, side) if torch.device(device).type == "cpu" else \
        (family.native_height // family.vae_scale, family.native_width // family.vae_scale)
    args = tuple(a.to(device) for a in spec.sample_inputs(spec.axes(spec.batch_range[1], h, w, family.vae_scale)))
    module, owned = _module_on(module, spec, device)
    try:
        wrapper = _wrapper(module, spec, family.is_xl, wrap)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".export-{spec.name}-") as tmp:
            raw = Path(tmp) / "raw.onnx"
            with torch.no_grad(), warnings.catch_warnings(), mid_dilation(module, spec.dilation):
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, args, str(raw), input_names=[t.name for t in spec.inputs],
                                  output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                                  opset_version=OPSET, do_constant_folding=True, dynamo=False)
            del wrapper, args
            if owned:
                del module
            gc.collect()
            files = _finish(raw, path, clean, PROTOBUF_LIMIT)
    except Exception as e:  # noqa: BLE001 - one message naming the network, cause chained
        raise ExportError(f"exporting {spec.name} failed: {type(e).__name__}: {e}") from e
    return ExportResult(files, time.perf_counter() - t0, sum(f.stat().st_size for f in files))


def export_control_aoti(module: torch.nn.Module, family: ModelFamily, spec: ControlSpec, profile, path,
                        *, device: str = "cpu", kernel_context=contextlib.nullcontext,
                        prepare: Callable[[torch.nn.Module], None] | None = None, wrap=None) -> ExportResult:
    """A static AOTInductor package (`.pt2`) for the one stage shape of `profile` (batch over the spec's range).
    `prepare`: applied in place to a copy of the module before the export (the caller's module is left as it is,
    so its weights fingerprint stays that of the loaded weights)."""
    t0 = time.perf_counter()
    path = Path(path)
    for name, lo, _, hi in profile.shapes:
        if len(lo) == 4 and lo[2:] != hi[2:]:
            raise ExportError(f"{spec.name}: ControlNet packages are static per stage shape; input {name} spans "
                              f"{lo} to {hi} (leave out --dynamic)")
    sample = profile.shapes[0][3]  # the largest batch: a batch of 1 would be specialised
    axes = spec.axes(sample[0], sample[2], sample[3], family.vae_scale)
    args = tuple(a.to(device) for a in spec.sample_inputs(axes))
    module, owned = _module_on(module, spec, device)
    if prepare is not None:
        if not owned:
            module = cast_copy(module, module.dtype)
        prepare(module)

    def trace():
        wrapper = _wrapper(module, spec, family.is_xl, wrap)
        per_input = [dynamic_shapes(family, spec, profile)[t.name] for t in spec.inputs]
        with mid_dilation(module, spec.dilation):
            # The wrappers take (sample, timestep, encoder states, *rest): torch.export wants that structure.
            return torch.export.export(wrapper, args, dynamic_shapes=(*per_input[:3], tuple(per_input[3:])),
                                       strict=False)

    return package_exported(trace, path, spec.name, t0, kernel_context=kernel_context)
