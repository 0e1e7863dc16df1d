"""The networks of a transformer family (SD3, FLUX) as the flow stage loop calls them; the torch modules.

Every call takes and returns float32 tensors on the runtime's device; the modules run in their own dtype.
Latents stay (B, C, h, w) outside: FLUX's 2x2 packing into tokens (and its position ids) happens here.
"""
from __future__ import annotations

import torch

from ..core.dit_loading import DiTBundle


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's tokens, 2x2 latent cells each (diffusers `_pack_latents`)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for a latent of h x w cells."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) FLUX position ids of the image tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowTorchNetworks:
    """The PyTorch modules of a `DiTBundle`."""

    def __init__(self, bundle: DiTBundle, vae_dtype: torch.dtype | None = None):
        self.bundle = bundle
        self.kind = bundle.family.kind
        self.transformer_dtype = bundle.transformer.dtype
        if vae_dtype is not None and vae_dtype != bundle.vae.dtype:
            bundle.vae.to(dtype=vae_dtype)
        self.vae_dtype = bundle.vae.dtype
        self.guidance_embeds = bool(getattr(bundle.transformer.config, "guidance_embeds", False))
        self.transformer_fn = bundle.transformer
        self._ids: dict[tuple, torch.Tensor] = {}  # FLUX position ids per latent size: no host copy per step

    @torch.inference_mode()
    def velocity(self, z: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor,
                 guidance: float) -> torch.Tensor:
        """v for the batch z (B, C, h, w) at `timestep` (B,) = 1000 sigma. SD3: the CFG batch as given; FLUX:
        `guidance` goes into the guidance embedding (where the model has one)."""
        dt = self.transformer_dtype
        if self.kind == "sd3":
            return self.transformer_fn(hidden_states=z.to(dt), timestep=timestep, encoder_hidden_states=states.to(dt),
                                       pooled_projections=pooled.to(dt), return_dict=False)[0].float()
        b, _, h, w = z.shape
        g = torch.full([b], guidance, device=z.device, dtype=torch.float32) if self.guidance_embeds else None
        out = self.transformer_fn(
            hidden_states=pack(z).to(dt), timestep=timestep.to(dt) / 1000, guidance=g,
            pooled_projections=pooled.to(dt), encoder_hidden_states=states.to(dt),
            txt_ids=self._cached_ids(("txt", states.shape[1]), lambda: torch.zeros(states.shape[1], 3), z.device),
            img_ids=self._cached_ids(("img", h, w), lambda: image_ids(h, w, "cpu", torch.float32), z.device),
            return_dict=False)[0]
        return unpack(out.float(), h, w)

    def _cached_ids(self, key: tuple, make, device) -> torch.Tensor:
        key = (*key, str(device), self.transformer_dtype)
        if key not in self._ids:
            self._ids[key] = make().to(device=device, dtype=self.transformer_dtype)
        return self._ids[key]

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Image in about [-1, 1] from VAE-space latents (already unscaled and unshifted)."""
        return self.bundle.vae.decode(latents.to(self.vae_dtype), return_dict=False)[0].float()

    @torch.inference_mode()
    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean (VAE space) of images (B, 3, H, W)."""
        return self.bundle.vae.encode(images.to(self.vae_dtype)).latent_dist.mean.float()

    @torch.inference_mode()
    def clip(self, index: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP encoder `index`: (penultimate hidden states, pooled embedding: the projection where the encoder
        has one, else the pooler output), as SD3's and FLUX's pipelines read them."""
        enc = self.bundle.text_encoders[index]
        out = enc(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2].float(), pooled.float()

    @torch.inference_mode()
    def t5(self, input_ids: torch.Tensor) -> torch.Tensor:
        """T5's last hidden states."""
        return self.bundle.text_encoders[-1](input_ids)[0].float()
