"""ONNX export of DeepFloyd IF's two pixel UNets (docs/ALGORITHM.md §20), one file per cascade stage, precision
and mid-block dilation; spatial axes dynamic, so one file serves every MegaFusion stage of its cascade stage.

The specs reuse core/specs' TensorSpec/NetworkSpec; `image_height`/`image_width` are the sample's own sides
(IF has no VAE). The export itself is onnx_export's trace and clean-up.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from ..core.dilation import Variant, mid_dilation
from ..core.if_family import IFFamily
from ..core.if_loading import IFBundle
from ..core.specs import UNET, NetworkSpec, TensorSpec
from .onnx_export import PROTOBUF_LIMIT, ExportError, ExportResult, _finish, _trace, cast_copy


def if_unet_spec(family: IFFamily, cascade: int, precision: str = "fp32", dilation: int = 1) -> NetworkSpec:
    """[eps, v] = UNet(sample, timestep, encoder_hidden_states[, class_labels]) at mid dilation `dilation`;
    stage II's sample is the 6-channel [x, noised upscaled stage I image], its class label the noise level."""
    f = "float16" if precision == "fp16" else "float32"
    cfg = family.unet_1 if cascade == 1 else family.unet_2
    image = ("batch", int(cfg["in_channels"]), "image_height", "image_width")
    inputs = [TensorSpec("sample", f, image),
              TensorSpec("timestep", "float32", (1,)),  # float32 even at fp16: integer timesteps stay exact
              TensorSpec("encoder_hidden_states", f, ("batch", family.max_length, int(cfg["encoder_hid_dim"])))]
    if cascade == 2:
        inputs.append(TensorSpec("class_labels", "float32", ("batch",)))
    out = TensorSpec("eps_var", f, ("batch", int(cfg["out_channels"]), "image_height", "image_width"))
    variant = Variant.STANDARD if dilation == 1 else Variant.DILATED
    return NetworkSpec(f"{UNET}_{'I' * cascade}", variant, dilation, precision, tuple(inputs), (out,), (1, 2, 2))


class IFUNetWrapper(torch.nn.Module):
    """The UNet's 6 output channels from flat tensors."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                         return_dict=False)[0]


def if_sample_inputs(spec: NetworkSpec, batch: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Plausible inputs: random sample and text states, timestep 981, noise level 250."""
    g = torch.Generator().manual_seed(seed)
    axes = {"batch": batch, "image_height": height, "image_width": width}
    out = []
    for t in spec.inputs:
        shape = t.concrete(axes)
        if t.name == "timestep":
            x = torch.full(shape, 981.0)
        elif t.name == "class_labels":
            x = torch.full(shape, 250.0)
        else:
            x = torch.randn(shape, generator=g)
        out.append(x.to(t.torch_dtype))
    return tuple(out)


def export_if_unet(bundle: IFBundle, spec: NetworkSpec, path: str | os.PathLike, *, device: str = "cpu",
                   size: int | None = None, external_threshold: int = PROTOBUF_LIMIT) -> ExportResult:
    """Exports the spec's UNet (`unet_I` or `unet_II`) to `path`, traced at `size` pixels per side (default: the
    smallest side the UNet accepts, so an fp16 trace stays short on a CPU; the axes are dynamic)."""
    t0 = time.perf_counter()
    path = Path(path)
    cascade = 1 if spec.network.endswith("_I") else 2
    module = bundle.unet_1 if cascade == 1 else bundle.unet_2
    if module is None:
        raise ExportError(f"{spec.network}: this bundle has no stage II UNet")
    side = size or bundle.family.pixel_multiple(cascade)
    args = tuple(a.to(device) for a in if_sample_inputs(spec, spec.batch_range[1], side, side))
    dtype = spec.outputs[0].torch_dtype
    owned = dtype != module.dtype or torch.device(device) != module.device
    if owned:
        module = cast_copy(module, dtype).to(device)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".export-{spec.name}-") as tmp:
            raw = Path(tmp) / "raw.onnx"
            with mid_dilation(module, spec.dilation):  # _trace sets it only for the latent families' "unet"
                _trace(IFUNetWrapper(module).eval(), module, spec, args, raw)
            files = _finish(raw, path, True, external_threshold)
    except Exception as e:  # noqa: BLE001 - one message naming the network, cause chained
        raise ExportError(f"exporting {spec.name} failed: {type(e).__name__}: {e}") from e
    return ExportResult(files, time.perf_counter() - t0, sum(f.stat().st_size for f in files))
