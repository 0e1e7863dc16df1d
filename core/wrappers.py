"""The networks as flat-tensor modules, one per network spec: what export traces and the torch backend runs.

Each wrapper takes the spec's inputs in order and returns its outputs in order, so a torch module and an
exported engine are called the same way (`megafusion.engine.runners`).
"""
from __future__ import annotations

import torch

from .specs import UNET, VAE_DECODER, VAE_ENCODER, NetworkSpec


class UNetWrapper(torch.nn.Module):
    """eps from flat tensors; SDXL's added conditioning as two more inputs."""

    def __init__(self, unet: torch.nn.Module, xl: bool):
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.xl else None
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, return_dict=False)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """Posterior mean (unscaled latent) of an image in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean


class VaeDecoderWrapper(torch.nn.Module):
    """Image from an unscaled latent."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class TextEncoderWrapper(torch.nn.Module):
    """Hidden states the UNet reads (last layer for SD1.5, penultimate for SDXL), plus pooled if projected."""

    def __init__(self, encoder: torch.nn.Module, xl: bool, pooled: bool):
        super().__init__()
        self.encoder, self.xl, self.pooled = encoder, xl, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids.long(), output_hidden_states=self.xl)
        hidden = out.hidden_states[-2] if self.xl else out[0]
        return (hidden, out[0]) if self.pooled else hidden


def wrap(module: torch.nn.Module, spec: NetworkSpec, xl: bool) -> torch.nn.Module:
    if spec.network == UNET:
        return UNetWrapper(module, xl)
    if spec.network == VAE_ENCODER:
        return VaeEncoderWrapper(module)
    if spec.network == VAE_DECODER:
        return VaeDecoderWrapper(module)
    return TextEncoderWrapper(module, xl, len(spec.outputs) == 2)
