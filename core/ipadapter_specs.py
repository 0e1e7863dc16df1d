"""Spec of the IP-Adapter UNet engines (issue #18 items 2 and 5): `unet_ip`, the UNet with an IP-Adapter loaded
(its image projection and IP attention processors inside the exported network, the IP scale baked in).

Inputs: the UNet's (sample, timestep, encoder states[, text_embeds, time_ids]) plus `image_embeds` (batch, 1, D), D
the image encoder's projection dim (the IP-Adapter's `image_proj.proj.weight` columns): the CLIP vision
`image_embeds` of the reference image, [zeros, embeds] on the CFG batch. Output: eps. A network of its own, so a
plain UNet entry never stands in for it; its key's weights field holds the UNet's fingerprint, the IP-Adapter
file's and the scale (engine/fingerprint.py `ip_adapter_fingerprint`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .families import ModelFamily
from .plan import StagePlan
from .specs import NetworkSpec, Requirement, TensorSpec, unet_spec, unet_stage_requirements

UNET_IP = "unet_ip"


@dataclass(frozen=True)
class IPSpec(NetworkSpec):
    """A NetworkSpec named with its variant, as the UNet's."""

    @property
    def name(self) -> str:
        return f"{self.network}-{self.variant}-{self.precision}"


def ip_unet_spec(family: ModelFamily, embed_dim: int, precision: str = "fp32", dilation: int = 1) -> IPSpec:
    """eps = UNet with IP-Adapter(sample, timestep, encoder states[, text_embeds, time_ids], image_embeds)."""
    u = unet_spec(family, precision, dilation)
    f = u.inputs[0].dtype
    inputs = (*u.inputs, TensorSpec("image_embeds", f, ("batch", 1, int(embed_dim))))
    return IPSpec(UNET_IP, u.variant, dilation, precision, inputs, u.outputs, u.batch_range)


def ip_requirements(family: ModelFamily, plan: StagePlan, embed_dim: int, precision: str = "fp32",
                    dilation: int = 2) -> tuple[Requirement, ...]:
    """The unet_ip networks a plan runs: standard at stage 1, dilated (unless dilation is 1) later, one profile per
    distinct stage size, as `plan_requirements` gives the UNet's."""
    return unet_stage_requirements(family, plan, dilation, lambda d: (ip_unet_spec(family, embed_dim, precision, d),))
