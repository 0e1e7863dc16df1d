"""Specs of the ControlNet engines (issue #18 item 1; docs/ALGORITHM.md §16): the ControlNet itself and the UNet
that takes its residuals (`unet_controlled`, a network of its own so a plain UNet entry never stands in for it).

The residuals sit at the UNet's down-block resolutions: latent sides divided by 2^k. Their axes are named
`height/2^k` / `width/2^k` (k > 0); `ControlSpec.axes` derives them from the latent sides, which are multiples of
2^(UNet downsamples), so every division is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

from .families import ModelFamily
from .plan import StagePlan
from .specs import NetworkSpec, Requirement, TensorSpec, unet_spec, unet_stage_requirements

CONTROLNET, UNET_CONTROLLED = "controlnet", "unet_controlled"


def residual_layout(config) -> tuple[tuple[int, int], ...]:
    """(channels, k: latent sides / 2^k) of each down residual, as diffusers' ControlNetModel returns them (conv_in,
    each down block's resnets, its downsampler unless last), then of the mid residual."""
    chans = list(config["block_out_channels"])
    out = [(chans[0], 0)]
    for i, c in enumerate(chans):
        out += [(c, i)] * int(config["layers_per_block"])
        if i < len(chans) - 1:
            out.append((c, i + 1))
    out.append((chans[-1], len(chans) - 1))
    return tuple(out)


def _side(axis: str, k: int) -> str:
    return axis if k == 0 else f"{axis}/{2 ** k}"


@dataclass(frozen=True)
class ControlSpec(NetworkSpec):
    """A NetworkSpec whose residual axes follow from the latent sides."""

    depth: int = 0
    """Largest k of the residual axes."""

    @property
    def name(self) -> str:
        return f"{self.network}-{self.variant}-{self.precision}"

    def axes(self, batch: int, latent_height: int, latent_width: int, vae_scale: int) -> dict[str, int]:
        out = super().axes(batch, latent_height, latent_width, vae_scale)
        for k in range(1, self.depth + 1):
            out[_side("height", k)], out[_side("width", k)] = latent_height // 2 ** k, latent_width // 2 ** k
        return out


def _residuals(f: str, config) -> tuple[TensorSpec, ...]:
    layout = residual_layout(config)
    specs = [TensorSpec(f"down_{i}", f, ("batch", c, _side("height", k), _side("width", k)))
             for i, (c, k) in enumerate(layout[:-1])]
    c, k = layout[-1]
    return (*specs, TensorSpec("mid", f, ("batch", c, _side("height", k), _side("width", k))))


def controlnet_spec(family: ModelFamily, config, precision: str = "fp32", dilation: int = 1) -> ControlSpec:
    """(down_0..down_n, mid) = ControlNet(sample, timestep, encoder states[, text_embeds, time_ids], control image at
    the stage's pixel size, conditioning scale) at mid dilation `dilation` (its mid block is a copy of the UNet's,
    dilated alike); the scale is an input, so one engine serves any scale and the scale table's zeros."""
    u = unet_spec(family, precision, dilation)
    f = u.inputs[0].dtype
    inputs = (*u.inputs, TensorSpec("controlnet_cond", f, ("batch", 3, "image_height", "image_width")),
              TensorSpec("conditioning_scale", f, (1,)))
    return ControlSpec(CONTROLNET, u.variant, dilation, precision, inputs, _residuals(f, config), u.batch_range,
                       depth=residual_layout(config)[-1][1])


def controlled_unet_spec(family: ModelFamily, precision: str = "fp32", dilation: int = 1) -> ControlSpec:
    """eps = UNet(sample, timestep, encoder states[, text_embeds, time_ids], down_0..down_n, mid): the residuals
    added where diffusers adds a ControlNet's (their layout is the UNet's own, so the UNet's config gives it)."""
    u = unet_spec(family, precision, dilation)
    f = u.inputs[0].dtype
    res = _residuals(f, family.unet)
    return ControlSpec(UNET_CONTROLLED, u.variant, dilation, precision, (*u.inputs, *res), u.outputs, u.batch_range,
                       depth=residual_layout(family.unet)[-1][1])


def controlnet_requirements(family: ModelFamily, plan: StagePlan, config, precision: str = "fp32",
                            dilation: int = 2) -> tuple[Requirement, ...]:
    """The ControlNet (config: its diffusers config) and controlled-UNet networks a plan runs: standard at stage 1,
    dilated (unless dilation is 1) later, one profile per distinct stage size, as `plan_requirements` gives the
    UNet's."""
    return unet_stage_requirements(family, plan, dilation, lambda d: (
        controlnet_spec(family, config, precision, d), controlled_unet_spec(family, precision, d)))

