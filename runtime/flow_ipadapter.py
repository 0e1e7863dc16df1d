"""IP-Adapter for FLUX through the relay (docs/ALGORITHM.md §18, "IP-Adapter"): diffusers' FluxIPAdapterMixin.

`read_flux_ip_adapter` reads an IP-Adapter file in either layout diffusers' `FluxIPAdapterMixin.load_ip_adapter`
takes (XLabs' `ip_adapter_proj_model.*` / `double_blocks.*`, or `image_proj.*` / `ip_adapter.*`) and checks it
against the transformer before anything changes; `load_flux_ip_adapter` puts it in with diffusers' own
`_load_ip_adapter_weights` (the double blocks' attention gains image key/value projections, the transformer an
image projection). `FlowIPAdapterNetworks` then hands the image embeddings to every transformer call, at every
stage: they describe the reference image, not the canvas. The transformer changes in place: give it a bundle of
its own. Torch path only. SD3's IP-Adapter (a timestep-dependent projection, SigLIP features) is in
runtime/flow_ipadapter_sd3.py.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine.flow_networks import FlowTorchNetworks
from ..engine.networks import WrappedNetworks
from .ipadapter import IPAdapterError

_PROJ_PREFIXES = ("ip_adapter_proj_model.", "image_proj.")
_ATTN_PREFIXES = ("double_blocks.", "ip_adapter.")


def _diffusers_name(key: str) -> tuple[str, str] | None:
    """(part, name) as FluxIPAdapterMixin.load_ip_adapter renames a safetensors key; None: not an adapter key."""
    rest = ".".join(key.split(".")[1:])
    if key.startswith(_PROJ_PREFIXES):
        return "image_proj", rest
    if key.startswith(_ATTN_PREFIXES):
        return "ip_adapter", (rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                              .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", ""))
    return None


def read_flux_ip_adapter(path: str | Path, transformer: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} from a .safetensors file, checked against FLUX's double blocks."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: no such file")
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    try:
        with safe_open(str(p), framework="pt") as f:
            for key in f.keys():
                named = _diffusers_name(key)
                if named is None:
                    raise IPAdapterError(f"--ip-adapter {str(path)!r}: unknown key {key!r} (expected FLUX "
                                         "IP-Adapter keys: ip_adapter_proj_model.* and double_blocks.*)")
                out[named[0]][named[1]] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: not a readable safetensors file ({e})") from None
    cfg = transformer.config
    text, width = cfg.joint_attention_dim, cfg.num_attention_heads * cfg.attention_head_dim
    proj = out["image_proj"].get("proj.weight")
    if proj is None or proj.shape[0] not in (4 * text, 16 * text):
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: image projection "
                             f"{None if proj is None else tuple(proj.shape)} does not give 4 or 16 tokens of the "
                             f"transformer's {text} text features (an IP-Adapter for another architecture?)")
    for i in range(cfg.num_layers):
        for kv in ("to_k_ip", "to_v_ip"):
            w = out["ip_adapter"].get(f"{i}.{kv}.weight")
            if w is None or tuple(w.shape) != (width, text) or f"{i}.{kv}.bias" not in out["ip_adapter"]:
                raise IPAdapterError(f"--ip-adapter {str(path)!r}: double block {i}'s {kv} is "
                                     f"{None if w is None else tuple(w.shape)}, the transformer needs "
                                     f"{(width, text)} with a bias (an IP-Adapter for another architecture?)")
    if len(out["ip_adapter"]) != 4 * cfg.num_layers:
        raise IPAdapterError(f"--ip-adapter {str(path)!r}: {len(out['ip_adapter'])} attention tensors for the "
                             f"transformer's {cfg.num_layers} double blocks (an IP-Adapter for another architecture?)")
    return out


def load_flux_ip_adapter(transformer: torch.nn.Module, state_dict: dict[str, dict[str, torch.Tensor]],
                         scale: float = 1.0) -> None:
    """diffusers' `_load_ip_adapter_weights` (what `pipe.load_ip_adapter` calls), then the scale on every
    IP-Adapter processor (what `pipe.set_ip_adapter_scale` sets)."""
    transformer._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
    transformer.to(device=transformer.device, dtype=transformer.dtype)  # the new layers where the model is
    for proc in transformer.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [scale]


class FlowIPAdapterNetworks(WrappedNetworks):
    """FLUX networks whose transformer gets the IP-Adapter image embeddings at every call."""

    def __init__(self, base: FlowTorchNetworks, image_embeds: torch.Tensor):
        super().__init__(base)
        if base.bundle.family.kind != "flux":
            raise ValueError(f"FlowIPAdapterNetworks takes FLUX networks, not {base.bundle.family.name}")
        self.image_embeds = image_embeds.to(base.bundle.transformer.device, base.transformer_dtype)
        """(1, 1, D) embeddings of the IP-Adapter image (the image encoder's `image_embeds`), FluxPipeline's
        `ip_adapter_image_embeds` entry."""

    @torch.inference_mode()
    def velocity(self, z, timestep, states, pooled, guidance, extra: dict | None = None) -> torch.Tensor:
        # A new dict each call: the transformer pops the embeddings out of it.
        kwargs = {"joint_attention_kwargs": {"ip_adapter_image_embeds": [self.image_embeds]}}
        return self.base.velocity(z, timestep, states, pooled, guidance, {**(extra or {}), **kwargs})
