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
    inductor_options: tuple[tuple[str, object], ...] = ()
    """Per-compile Inductor settings (e.g. ("conv_1x1_as_mm", True)); replaces `compile_mode` when given."""
    attention: str = "auto"
    """SDPA backend: `auto` (torch's choice), `cudnn`, `flash` or `efficient`; fixed at trace/capture time."""
    cudnn_benchmark: bool = True
    """Let cuDNN time its convolution algorithms per shape (process-wide flag, set when the backend is built)."""


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
        if options.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if options.compile_unet:
            self.unet_fn = self._compile(unet)
        if options.compile_vae:
            self.decode_fn = self._compile(self._decode)
            self.encode_fn = self._compile(self._encode)
        if options.attention != "auto":
            self.unet_fn = _with_sdpa_backend(self.unet_fn, options.attention)

    def _compile(self, fn):
        o = self.options
        if o.inductor_options:
            return torch.compile(fn, options=dict(o.inductor_options), fullgraph=True, dynamic=False)
        return torch.compile(fn, mode=o.compile_mode, fullgraph=True, dynamic=False)


def _with_sdpa_backend(fn, name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; choose auto, {', '.join(backends)}")
    backend = backends[name]

    def call(*args, **kwargs):
        with sdpa_kernel([backend]):
            return fn(*args, **kwargs)

    return call
