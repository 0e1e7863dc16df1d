"""IP-Adapter through the relay: image embeddings computed once, injected at every stage (diffusers' loaders).

`load_ip_adapter` puts an IP-Adapter state dict (`image_proj.*`, `ip_adapter.*`, as diffusers' `load_ip_adapter`
reads it) into the UNet with diffusers' own converter: the cross-attention processors gain the image key/value
projections and the UNet an image projection. `IPAdapterNetworks` then passes the embeddings with every UNet call;
they do not depend on the stage's size, so every stage sees the same ones. The UNet is changed in place: give it
a bundle of its own. Torch path (mf-generate --ip-adapter), with or without ControlNets.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.dilation import mid_dilation
from ..core.image_encoder import IPAdapterError, load_image_encoder, load_image_processor  # noqa: F401  (runtime's API)
from ..core.ipadapter import load_ip_adapter  # noqa: F401  (runtime's API; core holds it for export)
from ..engine.networks import TorchNetworks, WrappedNetworks
from ..engine.runners import run_spec


def read_ip_adapter(path: str | Path, unet: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} from a .safetensors file (keys `image_proj.*`, `ip_adapter.*`),
    checked against the UNet's cross-attention layers before anything is changed."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: not a readable safetensors file ({e})") from None
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, t in flat.items():
        part, _, rest = key.partition(".")
        if part not in out:
            raise IPAdapterError(f"--ip-adapter {str(path)!r}: unknown key {key!r} (expected image_proj.* and "
                                 "ip_adapter.*)")
        out[part][rest] = t
    proj = out["image_proj"].get("proj.weight")
    cross = unet.config.cross_attention_dim
    layers = [n.removesuffix(".processor") for n in unet.attn_processors if not n.endswith("attn1.processor")]
    if proj is None or proj.shape[0] != 4 * cross:
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: image_proj.proj.weight "
                             f"{None if proj is None else tuple(proj.shape)} does not give 4 tokens of the UNet's "
                             f"{cross} features (only the basic IP-Adapter is taken, for this architecture)")
    for i, name in enumerate(layers):
        hidden = unet.get_submodule(name).to_q.out_features
        for kv in ("to_k_ip", "to_v_ip"):
            w = out["ip_adapter"].get(f"{2 * i + 1}.{kv}.weight")
            if w is None or tuple(w.shape) != (hidden, cross):
                raise IPAdapterError(f"--ip-adapter {str(path)!r}: ip_adapter.{2 * i + 1}.{kv}.weight is "
                                     f"{None if w is None else tuple(w.shape)}, the UNet's {name} needs "
                                     f"{(hidden, cross)} (an IP-Adapter for another architecture?)")
    if len(out["ip_adapter"]) != 2 * len(layers):
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: {len(out['ip_adapter'])} ip_adapter tensors for the "
                             f"UNet's {len(layers)} cross-attention layers (an IP-Adapter for another architecture?)")
    return out


@torch.inference_mode()
def encode_ip_image(encoder, processor, image, device) -> torch.Tensor:
    """(1, 1, D) image embeddings of a PIL image, as diffusers' `encode_image` computes them."""
    pixels = processor(image, return_tensors="pt").pixel_values.to(device=device, dtype=encoder.dtype)
    return encoder(pixels).image_embeds.float()[None]


def cfg_image_embeds(image_embeds: torch.Tensor, cfg: bool) -> torch.Tensor:
    """(1, n_images, D) embeddings as the UNet batch takes them: [zeros, embeds] with CFG, as diffusers' pipelines
    make the negative for an IP-Adapter image."""
    return torch.cat([torch.zeros_like(image_embeds), image_embeds]) if cfg else image_embeds


class IPAdapterNetworks(WrappedNetworks):
    """Torch networks whose UNet gets the IP-Adapter image embeddings at every call (implements Networks)."""

    def __init__(self, base: TorchNetworks, image_embeds: torch.Tensor):
        super().__init__(base)
        self.image_embeds = image_embeds
        """(1, n_images, D) embeddings of the IP-Adapter image (the image encoder's `image_embeds`)."""

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, dilation, residuals=None):
        """`residuals`: optional ControlNet residuals (runtime/controlnet.py wraps these networks too)."""
        dt = self.unet_dtype
        embeds = cfg_image_embeds(self.image_embeds.to(sample.device, dt), sample.shape[0] == 2)
        added = {"image_embeds": [embeds]}
        if text_embeds is not None:
            added.update(text_embeds=text_embeds.to(dt), time_ids=time_ids.to(dt))
        extra = {}
        if residuals is not None:
            extra = {"down_block_additional_residuals": residuals[0], "mid_block_additional_residual": residuals[1]}
        with mid_dilation(self.bundle.unet, dilation):
            out = self.base.unet_fn(sample.to(dt), timestep, encoder_hidden_states=encoder_hidden_states.to(dt),
                                    added_cond_kwargs=added, return_dict=False, **extra)[0]
        return out.float()


class EngineIPAdapterNetworks(WrappedNetworks):
    """Built engines whose UNet step runs the `unet_ip` engine (engine/ipadapter_engines.py) with the image
    embeddings; every other call goes to `base` (whose plain UNet engines stay unopened). The embeddings live in one
    device buffer per UNet batch, made once, so the step stays capturable where the runners are."""

    def __init__(self, base, image_embeds: torch.Tensor, runners: dict[int, object], device):
        super().__init__(base)
        self.ip_runners = runners
        """{dilation: unet_ip runner} (not `runners`: that name is the base's, keyed by (network, dilation))."""
        dtype = next(iter(runners.values())).spec.inputs[-1].torch_dtype
        e = image_embeds.to(device, dtype)
        self.embeds = {b: cfg_image_embeds(e, b == 2).contiguous() for b in (1, 2)}

    def set_image_embeds(self, image_embeds: torch.Tensor) -> None:
        """Another image's embeddings (mf-serve: one per request), copied into the buffers made at start, which a
        captured step reads."""
        for b, buf in self.embeds.items():
            buf.copy_(cfg_image_embeds(image_embeds.to(buf.device, buf.dtype), b == 2))

    @property
    def capturable(self) -> bool:
        return self.base.capturable and all(r.capturable for r in self.ip_runners.values())

    @torch.inference_mode()
    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, dilation):
        runner = self.ip_runners[dilation]
        given = {"sample": sample, "timestep": timestep.reshape(1).float(),
                 "encoder_hidden_states": encoder_hidden_states, "image_embeds": self.embeds[sample.shape[0]]}
        if text_embeds is not None:
            given.update(text_embeds=text_embeds, time_ids=time_ids)
        return run_spec(runner, given, sample.device)["eps"].float()
