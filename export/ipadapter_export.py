"""Export of the IP-Adapter UNet (`unet_ip`, core/ipadapter_specs.py): the UNet with an IP-Adapter loaded, traced
as one network whose last input is the image embeddings. ONNX and static AOTInductor packages go through
export/controlnet_export.py's functions (same tracing, mid-block dilation and clean-up) with this wrapper."""
from __future__ import annotations

import contextlib
import copy

import torch

from ..core.families import ModelFamily
from ..core.ipadapter_specs import IPSpec
from .controlnet_export import export_control_aoti, export_control_onnx


class IPUNetWrapper(torch.nn.Module):
    """eps from flat tensors, the image embeddings passed as diffusers' IP-Adapter UNet takes them."""

    def __init__(self, unet: torch.nn.Module, xl: bool):
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = {}
        if self.xl:
            text_embeds, time_ids, *rest = rest
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        (image_embeds,) = rest
        added["image_embeds"] = [image_embeds]
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


def ip_unet(unet: torch.nn.Module, state: dict, scale: float) -> torch.nn.Module:
    """A copy of `unet` with the IP-Adapter `state` (runtime/ipadapter.read_ip_adapter) loaded at `scale`; the copy
    shares the UNet's tensors (no second set of weights) and the caller's UNet keeps its own processors, so its
    weights fingerprint and the plain UNet's export stay as loaded."""
    from ..core.ipadapter import load_ip_adapter

    shared = {id(t): t for t in (*unet.parameters(), *unet.buffers())}
    out = copy.deepcopy(unet, shared)
    load_ip_adapter(out, state, scale)
    return out.eval()


def export_ip_onnx(module: torch.nn.Module, family: ModelFamily, spec: IPSpec, path, *, device: str = "cpu"):
    """`module` (an `ip_unet`) to the `.onnx` file `path`, batch and sides dynamic."""
    return export_control_onnx(module, family, spec, path, device=device, wrap=IPUNetWrapper)


def export_ip_aoti(module: torch.nn.Module, family: ModelFamily, spec: IPSpec, profile, path, *,
                   device: str = "cpu", kernel_context=contextlib.nullcontext):
    """A static AOTInductor package for the one stage shape of `profile`. The module is exported as loaded, not as
    the compiled path prepares the UNet (that preparation sets attention processors, which would drop the IP
    ones)."""
    return export_control_aoti(module, family, spec, profile, path, device=device, kernel_context=kernel_context,
                               wrap=IPUNetWrapper)
