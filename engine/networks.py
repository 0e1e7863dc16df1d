"""The networks the runtime calls, behind one small interface; `TorchNetworks` is the reference backend.

Every call takes and returns float32 tensors on the runtime's device; a backend casts to its own precision
inside. The UNet takes the CFG batch as given and returns eps.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..core.dilation import mid_dilation
from ..core.loading import ModelBundle


class Networks(Protocol):
    """What the stage loop needs from a backend."""

    unet_dtype: torch.dtype
    """The dtype the UNet takes its sample in; the pipeline draws noise in it, as diffusers does."""
    vae_dtype: torch.dtype
    """The dtype the VAE takes its input in; the pixel relay writes its resized image in it."""
    capturable: bool
    """Whether every call may run inside a CUDA graph capture (the graphed denoise loop needs it)."""

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None, dilation: int) -> torch.Tensor:
        """eps for `sample` (B, 4, h, w) at integer `timestep` (0-dim int64), mid-block dilation `dilation`."""

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (roughly) from unscaled latents (B, 4, h, w)."""

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the posterior (unscaled) for images (B, 3, H, W)."""

    def encode_text(self, index: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder `index`: (hidden states the UNet reads, pooled projection or None)."""


class WrappedNetworks:
    """`Networks` that change some calls of `base` (a ControlNet on the UNet step, an IP-Adapter, tiled VAE passes)
    and pass every other call and attribute (dtypes, `capturable`, `bundle`) to it unchanged."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):
        if name == "base":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


class TorchNetworks:
    """The PyTorch modules themselves."""

    def __init__(self, bundle: ModelBundle, vae_dtype: torch.dtype | None = None):
        self.bundle = bundle
        self.unet_dtype = bundle.unet.dtype
        if vae_dtype is not None and vae_dtype != bundle.vae.dtype:
            bundle.vae.to(dtype=vae_dtype)
        self.vae_dtype = bundle.vae.dtype
        self.text_dtype = bundle.text_encoders[0].dtype
        self.capturable = True  # plain torch ops on the current stream
        # The callables a faster subclass may replace (compiled versions of the same modules).
        self.unet_fn = bundle.unet
        self.decode_fn = self._decode
        self.encode_fn = self._encode
        self.text_released = False  # a one-shot run's text encoders are gone after its prompt

    def release_text_encoders(self) -> int:
        """Moves the text encoders' weights to the meta device: a one-shot run (mf-generate: one image per process)
        needs no text encoder after its prompt, and SDXL's are 1.6 GiB of fp16 weights held through every stage and
        the decode. The bundle cannot encode another prompt afterwards. Returns how many were released."""
        released = 0
        for enc in self.bundle.text_encoders:
            if enc.device.type != "meta":
                enc.to("meta")
                released += 1
        self.text_released = True
        if released and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return released

    def _decode(self, latents):
        return self.bundle.vae.decode(latents, return_dict=False)[0]

    def _encode(self, images):
        return self.bundle.vae.encode(images).latent_dist.mean

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, dilation, residuals=None):
        """`residuals`: optional (down block residuals, mid block residual) added inside the UNet, as diffusers
        adds a ControlNet's (runtime/controlnet.py); torch path only."""
        with mid_dilation(self.bundle.unet, dilation):  # weights untouched; restored after the call
            return self._unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids, residuals)

    def _unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, residuals=None):
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds.to(self.unet_dtype), "time_ids": time_ids.to(self.unet_dtype)}
        extra = {}
        if residuals is not None:
            extra = {"down_block_additional_residuals": residuals[0], "mid_block_additional_residual": residuals[1]}
        out = self.unet_fn(
            sample.to(self.unet_dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(self.unet_dtype),
            added_cond_kwargs=added, return_dict=False, **extra,
        )[0]
        return out.float()

    @torch.inference_mode()
    def vae_decode(self, latents):
        return self.decode_fn(latents.to(self.vae_dtype)).float()

    @torch.inference_mode()
    def vae_encode(self, images):
        return self.encode_fn(images.to(self.vae_dtype)).float()

    @torch.inference_mode()
    def encode_text(self, index, input_ids):
        if self.text_released:
            raise RuntimeError("the text encoders were released after this one-shot run's prompt; a pipeline that "
                               "generates more than once keeps them (one_shot=False)")
        enc = self.bundle.text_encoders[index]
        if not self.bundle.family.is_xl:
            return enc(input_ids)[0].float(), None  # SD1.5: last hidden state
        out = enc(input_ids, output_hidden_states=True)
        pooled = out[0].float() if out[0].ndim == 2 else None  # the projection model's text_embeds
        return out.hidden_states[-2].float(), pooled  # SDXL: penultimate layer
