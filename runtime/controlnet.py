"""ControlNets through the relay (docs/ALGORITHM.md §16): diffusers' `StableDiffusionControlNetPipeline` step at
every stage, with the control image resized to each stage's size.

`ControlledNetworks` wraps the torch networks: its `unet` runs every ControlNet on the same sample, timestep and
text conditioning, sums their down / mid residuals (as diffusers' MultiControlNetModel does) and hands them to the
UNet. Everything it reads lives in device buffers that keep their identity across generations (a scale table
indexed by timestep, one control-image buffer per stage size), so the step stays capturable: the CUDA graph of a
stage holds the ControlNets and the UNet in one step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.dilation import mid_dilation
from ..core.loading import WeightsOrigin, mark_origin
from ..core.plan import StagePlan
from ..engine.networks import TorchNetworks, WrappedNetworks
from .image_files import read_rgb
from .ipadapter import IPAdapterNetworks


class ControlInputError(ValueError):
    """A ControlNet, control image or schedule fraction that cannot be used; the message names it."""


@dataclass(frozen=True)
class Control:
    """One ControlNet with its image and schedule."""

    model: torch.nn.Module
    """diffusers `ControlNetModel`, on the runtime's device."""
    image: torch.Tensor
    """(1, 3, H, W) float32 in [0, 1] (diffusers' control images are not normalized), any size."""
    scale: float = 1.0
    """Conditioning scale: multiplies the residuals."""
    start: float = 0.0
    """Fraction of the global schedule before which the residuals are off."""
    end: float = 1.0
    """Fraction of the global schedule after which the residuals are off."""

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ControlInputError(f"--control-start {self.start:g} / --control-end {self.end:g}: need "
                                    "0 <= start < end <= 1")


def keep(i: int, total: int, start: float, end: float) -> float:
    """diffusers' `controlnet_keep` for global step i of `total`."""
    return 1.0 - float(i / total < start or (i + 1) / total > end)


def resize_control(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic to the stage's size (the relay's Phi), clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def read_control_image(path: str | Path) -> torch.Tensor:
    """An image file as (1, 3, H, W) float32 in [0, 1] (RGB); ControlInputError names a bad file."""
    return read_rgb(path, "--control-image", ControlInputError)


def load_controlnet(path: str | Path, unet: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """A diffusers ControlNetModel folder, checked against the UNet it must feed (another architecture is refused
    by name before it runs)."""
    from diffusers import ControlNetModel

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ControlInputError(f"--controlnet {str(path)!r}: not a diffusers ControlNetModel folder "
                                "(no config.json)")
    try:
        model = ControlNetModel.from_pretrained(str(p))
    except (OSError, ValueError, RuntimeError) as e:
        raise ControlInputError(f"--controlnet {str(path)!r}: cannot be loaded ({str(e).splitlines()[0]})") from None
    mine, theirs = unet.config, model.config
    for field in ("block_out_channels", "cross_attention_dim", "addition_embed_type", "in_channels"):
        a, b = theirs.get(field), mine.get(field)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise ControlInputError(f"--controlnet {str(path)!r}: {field} {a} does not match the UNet's {b} "
                                    "(a ControlNet for another architecture)")
    model = model.to(device=device, dtype=dtype).eval()
    mark_origin(model, WeightsOrigin("files", folder=str(p.resolve())))  # its engines' key: the folder's files
    return model


class ControlledNetworks(WrappedNetworks):
    """Torch networks whose UNet step adds the ControlNets' residuals (implements engine.networks.Networks)."""

    def __init__(self, base: TorchNetworks | IPAdapterNetworks, controls: list[Control], device):
        super().__init__(base)
        self.controls, self.device = controls, torch.device(device)
        prepare = getattr(base, "controlnet_call", None)  # the fast backend's: prepared, compiled with the UNet
        self.calls = [prepare(c.model) if prepare is not None else c.model for c in controls]
        """What runs ControlNet j: its module, or the fast backend's call site over it."""
        self.scales = torch.zeros(len(controls), 1000, device=self.device)
        """scale * keep of ControlNet j at timestep t: indexed by t on the device, so no host value enters a step."""
        self.images: dict[tuple[int, int, int], torch.Tensor] = {}
        """(UNet batch, latent h, latent w) -> (n_controls, batch, 3, H, W) control images, filled in place for
        each plan: one buffer per graph key, whose shape never changes."""

    def prepare_plan(self, plan: StagePlan, batch: int, timesteps) -> None:
        """Fills the scale table for the plan's global timesteps and the image buffer of every stage size."""
        total = len(timesteps)
        table = torch.zeros_like(self.scales, device="cpu")
        for j, c in enumerate(self.controls):
            for i, t in enumerate(timesteps):
                table[j, int(t)] = c.scale * keep(i, total, c.start, c.end)
        self.scales.copy_(table)
        vs = self.bundle.family.vae_scale
        # Resized and expanded to the batch on the device: with the resize on the host, the set-up before SDXL 2048's
        # stage 1 took 53-81 ms longer than the plain plan's (H200, benchmarks/RESULTS.md, 2026-12-04, 742e616).
        images = [c.image.to(self.device, torch.float32) for c in self.controls]
        for stage in plan.stages:
            imgs = torch.stack([resize_control(im, stage.height, stage.width)[0] for im in images])
            imgs = imgs.to(self.unet_dtype).unsqueeze(1).expand(-1, batch, -1, -1, -1)
            key = (batch, stage.height // vs, stage.width // vs)
            buf = self.images.get(key)
            if buf is None:
                self.images[key] = imgs.contiguous()
            else:
                buf.copy_(imgs)  # the same tensor a captured graph reads

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, dilation):
        dt = self.unet_dtype
        images = self.images[tuple(sample.shape[:1]) + tuple(sample.shape[-2:])]
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds.to(dt), "time_ids": time_ids.to(dt)}
        down = mid = None
        for j, c in enumerate(self.controls):
            scale = self.scales[j].index_select(0, timestep.view(1)).squeeze(0)
            with mid_dilation(c.model, dilation):  # the ControlNet's mid block is the UNet's copy: dilated alike
                d, m = self.calls[j](sample.to(dt), timestep, encoder_hidden_states=encoder_hidden_states.to(dt),
                                     controlnet_cond=images[j], conditioning_scale=scale.to(dt),
                                     added_cond_kwargs=added, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.base.unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids, dilation, (down, mid))


class EngineControlledNetworks(ControlledNetworks):
    """Built engines whose UNet step runs the ControlNet engines and then the controlled-UNet engine
    (engine/controlnet_engines.py); the scale table and image buffers are `ControlledNetworks`' (one capturable
    step: with aoti packages the ControlNets and the UNet sit in one CUDA graph)."""

    def __init__(self, base, bundle, controls: list[Control], device, controlnets: dict[int, list],
                 unets: dict[int, object]):
        super().__init__(base, controls, device)
        self.bundle = bundle  # engine networks hold no bundle; `prepare_plan` reads the family from it
        self.controlnet_runners, self.unet_runners = controlnets, unets
        """{dilation: one runner per control, in order}, {dilation: controlled-UNet runner}."""

    @property
    def capturable(self) -> bool:
        return self.base.capturable and all(r.capturable for rs in self.controlnet_runners.values() for r in rs) \
            and all(r.capturable for r in self.unet_runners.values())

    def _run(self, runner, **inputs):
        return runner.run({t.name: inputs[t.name].to(self.device, t.torch_dtype).contiguous()
                           for t in runner.spec.inputs})

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, dilation):
        images = self.images[tuple(sample.shape[:1]) + tuple(sample.shape[-2:])]
        common = {"sample": sample, "timestep": timestep.reshape(1).float(),
                  "encoder_hidden_states": encoder_hidden_states}
        if text_embeds is not None:
            common.update(text_embeds=text_embeds, time_ids=time_ids)
        residuals: dict[str, torch.Tensor] = {}
        for j, runner in enumerate(self.controlnet_runners[dilation]):
            scale = self.scales[j].index_select(0, timestep.view(1))  # (1,): the engine's conditioning_scale
            out = self._run(runner, **common, controlnet_cond=images[j], conditioning_scale=scale)
            residuals = out if not residuals else {k: residuals[k] + out[k] for k in residuals}
        return self._run(self.unet_runners[dilation], **common, **residuals)["eps"].float()
