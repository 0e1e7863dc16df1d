"""IP-Adapter through the relay: image embeddings computed once, injected at every stage (diffusers' loaders).

`load_ip_adapter` puts an IP-Adapter state dict (`image_proj.*`, `ip_adapter.*`, as diffusers' `load_ip_adapter`
reads it) into the UNet with diffusers' own converter: the cross-attention processors gain the image key/value
projections and the UNet an image projection. `IPAdapterNetworks` then passes the embeddings with every UNet call;
they do not depend on the stage's size, so every stage sees the same ones. The UNet is changed in place: give it
a bundle of its own. Torch path, no CLI yet.
"""
from __future__ import annotations

import torch

from ..core.dilation import mid_dilation
from ..engine.networks import TorchNetworks


def load_ip_adapter(unet: torch.nn.Module, state_dict: dict[str, dict[str, torch.Tensor]], scale: float = 1.0) -> None:
    """diffusers' `_load_ip_adapter_weights` (what `pipe.load_ip_adapter` calls), then the scale on every
    IP-Adapter processor (what `pipe.set_ip_adapter_scale` sets)."""
    unet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
    for proc in unet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [scale]


def cfg_image_embeds(image_embeds: torch.Tensor, cfg: bool) -> torch.Tensor:
    """(1, n_images, D) embeddings as the UNet batch takes them: [zeros, embeds] with CFG, as diffusers' pipelines
    make the negative for an IP-Adapter image."""
    return torch.cat([torch.zeros_like(image_embeds), image_embeds]) if cfg else image_embeds


class IPAdapterNetworks:
    """Torch networks whose UNet gets the IP-Adapter image embeddings at every call (implements Networks)."""

    def __init__(self, base: TorchNetworks, image_embeds: torch.Tensor):
        self.base, self.bundle = base, base.bundle
        self.unet_dtype, self.vae_dtype, self.capturable = base.unet_dtype, base.vae_dtype, base.capturable
        self.image_embeds = image_embeds
        """(1, n_images, D) embeddings of the IP-Adapter image (the image encoder's `image_embeds`)."""

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, dilation):
        dt = self.unet_dtype
        embeds = cfg_image_embeds(self.image_embeds.to(sample.device, dt), sample.shape[0] == 2)
        added = {"image_embeds": [embeds]}
        if text_embeds is not None:
            added.update(text_embeds=text_embeds.to(dt), time_ids=time_ids.to(dt))
        with mid_dilation(self.bundle.unet, dilation):
            out = self.base.unet_fn(sample.to(dt), timestep, encoder_hidden_states=encoder_hidden_states.to(dt),
                                    added_cond_kwargs=added, return_dict=False)[0]
        return out.float()

    def vae_decode(self, latents):
        return self.base.vae_decode(latents)

    def vae_encode(self, images):
        return self.base.vae_encode(images)

    def encode_text(self, index, input_ids):
        return self.base.encode_text(index, input_ids)
