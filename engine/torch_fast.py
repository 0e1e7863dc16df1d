"""The torch backend made fast: channels_last, fused QKV, SDPA attention, optional torch.compile.

Compilation is explicit (never at import) and per call site; static shapes, so each stage shape and each
UNet variant compiles once (the dilated variant differs in conv attributes that dynamo guards on).
Inductor's on-disk caches make a second process start faster; where they live is up to the caller
(TORCHINDUCTOR_CACHE_DIR).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megafusion.export.loading import ModelBundle

from .networks import TorchNetworks


@dataclass(frozen=True)
class FastOptions:
    """Which speed-ups to apply to the torch modules."""

    channels_last: bool = True
    """NHWC memory format for UNet and VAE convolutions (pays only together with compile)."""
    fuse_qkv: bool = True
    """One matmul for self-attention Q, K and V (diffusers' `fuse_qkv_projections`)."""
    compile_unet: bool = True
    """torch.compile the UNet (default mode, fullgraph, static shapes)."""
    compile_vae: bool = True
    """torch.compile the VAE decode and encode."""
    compile_mode: str = "default"
    """Inductor mode; `max-autotune` ran past 9 minutes on the real SDXL UNet, so it is not the default."""


class FastTorchNetworks(TorchNetworks):
    """`TorchNetworks` over optimised modules; same function, same interface."""

    def __init__(self, bundle: ModelBundle, options: FastOptions = FastOptions(), vae_dtype=None):
        super().__init__(bundle, vae_dtype)
        self.options = options
        unet, vae = bundle.unet, bundle.vae
        if options.fuse_qkv:
            unet.fuse_qkv_projections()
            vae.fuse_qkv_projections()
        if options.channels_last:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        if options.compile_unet:
            self.unet_fn = torch.compile(unet, mode=options.compile_mode, fullgraph=True, dynamic=False)
        if options.compile_vae:
            self.decode_fn = torch.compile(self._decode, mode=options.compile_mode, fullgraph=True, dynamic=False)
            self.encode_fn = torch.compile(self._encode, mode=options.compile_mode, fullgraph=True, dynamic=False)
