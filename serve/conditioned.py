"""The server's ControlNets and IP-Adapter (`mf-serve --controlnet`, `--ip-adapter`) around one replica's torch
networks, loaded once and set for one request at a time, as mf-generate builds them for one image
(cli/generate.py, cli/conditions.py `controlled_networks`).

Requests differ only in what lives in tensors and plain attributes: the control images and schedules
(`ControlledNetworks.prepare_plan` copies them into the buffers a captured graph reads), the IP-Adapter's image
embeddings and scale. A request without them runs on the networks below (an IP-Adapter at scale 0 is skipped by
diffusers' processor, so its images are the plain ones). The replica's lock keeps one request at a time here.
"""
from __future__ import annotations

import torch

from ..core.loading import ModelBundle
from ..runtime.controlnet import Control, ControlledNetworks, load_controlnet

from .conditions import Conditions
from .config import ServeConfig


class ServerConditions:
    """What the server adds to its networks; `networks_for(conditions)` gives the ones a request runs on."""

    def __init__(self, cfg: ServeConfig, bundle: ModelBundle, nets, device: torch.device):
        self.bundle, self.device = bundle, device
        self.ip = None
        if cfg.ip_adapter:
            from PIL import Image

            from ..runtime.ipadapter import (IPAdapterNetworks, encode_ip_image, load_image_encoder, load_ip_adapter,
                                             read_ip_adapter)

            state = read_ip_adapter(cfg.ip_adapter, bundle.unet)
            self.encoder, self.processor = load_image_encoder(cfg.ip_adapter_encoder, device, nets.unet_dtype)
            load_ip_adapter(bundle.unet, state, 0.0)
            self._encode = encode_ip_image
            self.no_image = torch.zeros_like(encode_ip_image(self.encoder, self.processor,
                                                             Image.new("RGB", (224, 224)), device))
            nets = self.ip = IPAdapterNetworks(nets, self.no_image)
        self.plain = nets
        self.modules = [load_controlnet(p, bundle.unet, device, nets.unet_dtype) for p in cfg.controlnets]
        self.controlled = None
        if self.modules:  # placeholder images: each request's are copied in by prepare_plan
            blank = torch.zeros(1, 3, 8, 8)
            self.controlled = ControlledNetworks(nets, [Control(m, blank) for m in self.modules], device)

    def networks_for(self, c: Conditions):
        """Sets the request's IP-Adapter image and scale and its control images; returns `plain` or `controlled`."""
        if self.ip is not None:
            embeds, scale = self.no_image, 0.0
            if c.ip_image is not None:
                embeds, scale = self._encode(self.encoder, self.processor, c.ip_image, self.device), c.ip_scale
            self.ip.image_embeds = embeds
            for proc in self.bundle.unet.attn_processors.values():
                if hasattr(proc, "to_k_ip"):
                    proc.scale = [scale]
        if not c.controls:
            return self.plain
        self.controlled.controls = [Control(m, ci.image, ci.scale, ci.start, ci.end)
                                    for m, ci in zip(self.modules, c.controls)]
        return self.controlled

    def describe(self) -> dict:
        return {"controlnets": len(self.modules), "ip_adapter": self.ip is not None}
