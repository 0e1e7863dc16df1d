"""The server's ControlNets and IP-Adapter for SD3 / FLUX (`mf-serve --controlnet`, `--ip-adapter`) around one
replica's flow networks, loaded once and set for one request at a time, as `mf-generate` builds them for one image
(cli/generate_flow.py: the IP-Adapter wraps the networks, the ControlNets wrap that).

Requests differ only in tensors and plain attributes: the control images and schedules (`ControlledFlowNetworks.
prepare_plan` copies them into its buffers at each generation), the IP-Adapter's image embeddings and scale. A
request without an IP-Adapter image runs it at scale 0 with zero embeddings: diffusers' processors add
`scale * ip_attention`, so the sum is the plain one plus an exact zero. The replica's lock keeps one request here.
"""
from __future__ import annotations

import torch

from ..core.dit_loading import DiTBundle
from ..runtime.controlnet import Control, ControlInputError
from ..runtime.flow_controlnet import ControlledFlowNetworks, load_flow_controlnet
from ..runtime.ipadapter import IPAdapterError

from .conditions import Conditions
from .config import ServeConfig


class FlowServerConditions:
    """What the server adds to its flow networks; `networks_for(conditions)` gives the ones a request runs on."""

    def __init__(self, cfg: ServeConfig, bundle: DiTBundle, nets, device: torch.device):
        self.bundle, self.device = bundle, device
        self.sd3 = bundle.family.kind == "sd3"
        self.ip = None
        dtype = nets.transformer_dtype
        try:
            if cfg.ip_adapter:
                nets = self.ip = self._load_ip_adapter(cfg, nets, dtype)
            self.plain = nets
            self.modules = [load_flow_controlnet(p, bundle.transformer, bundle.family, device, dtype)
                            for p in cfg.controlnets]
        except (IPAdapterError, ControlInputError) as e:  # the replica's start fails with the one line
            raise ValueError(str(e)) from None
        self.controlled = None
        if self.modules:  # placeholder images: each request's are set by networks_for, encoded by prepare_plan
            blank = torch.zeros(1, 3, 8, 8)
            self.controlled = ControlledFlowNetworks(nets, [Control(m, blank) for m in self.modules], device)

    def _load_ip_adapter(self, cfg: ServeConfig, nets, dtype):
        from PIL import Image

        t = self.bundle.transformer
        if self.sd3:  # SigLIP features, projected by the transformer at each step's timestep
            from ..runtime.flow_ipadapter_sd3 import (SD3IPAdapterNetworks, encode_sd3_ip_image, load_sd3_ip_adapter,
                                                      load_siglip_encoder, read_sd3_ip_adapter)

            state = read_sd3_ip_adapter(cfg.ip_adapter, t)
            self.encoder, self.processor = load_siglip_encoder(cfg.ip_adapter_encoder, self.device, dtype)
            load_sd3_ip_adapter(t, state, 0.0, f"--ip-adapter {cfg.ip_adapter!r}")
            self._encode, wrap = encode_sd3_ip_image, SD3IPAdapterNetworks
        else:  # FLUX: CLIP image embeddings into the double blocks
            from ..runtime.flow_ipadapter import FlowIPAdapterNetworks, load_flux_ip_adapter, read_flux_ip_adapter
            from ..runtime.ipadapter import encode_ip_image, load_image_encoder

            state = read_flux_ip_adapter(cfg.ip_adapter, t)
            self.encoder, self.processor = load_image_encoder(cfg.ip_adapter_encoder, self.device, dtype)
            load_flux_ip_adapter(t, state, 0.0)
            self._encode, wrap = encode_ip_image, FlowIPAdapterNetworks
        self.no_image = torch.zeros_like(self._encode(self.encoder, self.processor, Image.new("RGB", (224, 224)),
                                                      self.device))
        return wrap(nets, self.no_image)

    def _set_ip(self, embeds: torch.Tensor, scale: float) -> None:
        """The request's image embeddings and scale, where the wrappers and diffusers' processors read them."""
        wrapped = type(self.ip)(self.ip.base, embeds)  # the wrapper's own conversion (dtype, device, CFG halves)
        self.ip.image_embeds = wrapped.image_embeds
        if self.sd3:
            self.ip.cfg_embeds = wrapped.cfg_embeds
        for proc in self.bundle.transformer.attn_processors.values():
            if self.sd3 and hasattr(proc, "norm_ip"):
                proc.scale = scale  # what load_sd3_ip_adapter sets
            elif not self.sd3 and hasattr(proc, "to_k_ip"):
                proc.scale = [scale]  # what load_flux_ip_adapter sets

    def networks_for(self, c: Conditions):
        """Sets the request's IP-Adapter image and scale and its control images; returns `plain` or `controlled`."""
        if self.ip is not None:
            embeds, scale = self.no_image, 0.0
            if c.ip_image is not None:
                embeds, scale = self._encode(self.encoder, self.processor, c.ip_image, self.device), c.ip_scale
            self._set_ip(embeds, scale)
        if not c.controls:
            return self.plain
        self.controlled.controls = [Control(m, ci.image, ci.scale, ci.start, ci.end)
                                    for m, ci in zip(self.modules, c.controls)]
        return self.controlled
