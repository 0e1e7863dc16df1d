"""An IP-Adapter's weights put into a UNet, as diffusers' loaders put them (the torch path, runtime/ipadapter.py,
and the unet_ip export, export/ipadapter_export.py, both use it: so it lives below both)."""
from __future__ import annotations

import torch


def load_ip_adapter(unet: torch.nn.Module, state_dict: dict[str, dict[str, torch.Tensor]], scale: float = 1.0) -> None:
    """diffusers' `_load_ip_adapter_weights` (what `pipe.load_ip_adapter` calls), then the scale on every
    IP-Adapter processor (what `pipe.set_ip_adapter_scale` sets). The self-attentions keep the processors they had:
    diffusers makes each anew from its class with no arguments, which would drop a fast path's attention kernel."""
    before = unet.attn_processors
    unet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
    procs = unet.attn_processors
    unet.set_attn_processor({name: before[name] if name.endswith("attn1.processor") else proc
                             for name, proc in procs.items()})
    for proc in unet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [scale]
